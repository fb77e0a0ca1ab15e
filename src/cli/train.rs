//! `mep train`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use mep::data::{self, DataError, DataLocator, LoadOptions, Normalization};
use mep::device::Workload;
use mep::ep::{EqPropConfig, EqPropInit, SettleConfig};
use mep::estimate::{
    BackpropEstimator, EpConfig, EpEstimator, EqPropEstimator, GradientEstimator, Nudging,
};
use mep::loss::Loss;
use mep::model::Network;
use mep::model::{ModelSpec, Shape};
use mep::optim::{CompositeOptimizer, EstimatorChoice, Optimizer, Preset};
use mep::train::{OptimizerKind, TrainConfig, Trainer};
use serde::Serialize;

use super::Globals;
use super::progress::EpochBar;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Data set: mnist, fashion-mnist, xor, permuted-mnist[:K].
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Model spec (784-256-128-10, conv32k5-pool2-conv64k5-pool2-fc10, mlp-small, mlp,
    /// cnn, ...; the grammar is in the README).
    #[arg(long, default_value = "784-256-128-10")]
    model: ModelSpec,
    /// A preset: smep, smep_fast, sdmep, local_ep, natural_ep, muon_backprop, eqprop, sgd,
    /// adam. Its settings are overridden by --lr, --momentum, --weight-decay, --loss, --beta,
    /// --nudging and the --settle-* options.
    #[arg(long, conflicts_with_all = ["estimator", "optimizer"])]
    preset: Option<Preset>,
    /// Gradient estimator.
    #[arg(long, value_enum, default_value = "backprop")]
    estimator: EstimatorArg,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: OptimizerArg,
    /// Loss: mse (1/2 ||o - y||^2), mse-reference (no 1/2), ce, or ce:SMOOTHING
    /// (default: ce for backprop, mse for EP).
    #[arg(long)]
    loss: Option<Loss>,
    #[command(flatten)]
    ep: EpArgs,
    /// Epochs.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Learning rate (default: 0.1 for sgd, 0.001 for adam).
    #[arg(long)]
    lr: Option<f64>,
    /// Momentum (default 0.9, or the preset's).
    #[arg(long)]
    momentum: Option<f64>,
    /// Decoupled weight decay (default 0, or the preset's).
    #[arg(long)]
    weight_decay: Option<f64>,
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

/// Options of the EP estimators.
#[derive(Debug, Clone, Args)]
pub struct EpArgs {
    /// Nudge strength (default 0.5 for EP, 1.0 for EqProp).
    #[arg(long)]
    pub beta: Option<f32>,
    /// EP nudging: one-sided (default), random or centered.
    #[arg(long, value_parser = parse_nudging)]
    pub nudging: Option<Nudging>,
    /// Most settle steps per phase (default 30).
    #[arg(long)]
    pub settle_steps: Option<usize>,
    /// Settle step size, per sample (default 0.3).
    #[arg(long)]
    pub settle_lr: Option<f32>,
    /// Stop settling when the largest per-sample state-gradient norm is under TOL * beta
    /// (default 1e-3).
    #[arg(long)]
    pub settle_tol: Option<f32>,
    /// Check convergence every K settle steps (default 5).
    #[arg(long, value_name = "K")]
    pub settle_check: Option<usize>,
    /// Per-sample adaptive settle step (accept/reject by energy).
    #[arg(long)]
    pub adaptive: bool,
    /// EqProp: free-phase steps.
    #[arg(long, default_value_t = 40)]
    pub eqprop_free_steps: usize,
    /// EqProp: nudged-phase steps.
    #[arg(long, default_value_t = 4)]
    pub eqprop_nudged_steps: usize,
    /// EqProp: state step size.
    #[arg(long, default_value_t = 0.5)]
    pub eqprop_step: f32,
    /// EqProp: start each training sample's free phase from its previous states.
    #[arg(long)]
    pub persistent: bool,
}

pub fn parse_nudging(s: &str) -> Result<Nudging, String> {
    s.parse()
        .map_err(|e: mep::estimate::EstimateError| e.to_string())
}

impl EpArgs {
    /// `base` with the options given on the command line.
    pub fn override_settle(&self, base: SettleConfig) -> SettleConfig {
        SettleConfig {
            lr: self.settle_lr.unwrap_or(base.lr),
            steps: self.settle_steps.unwrap_or(base.steps),
            tol: self.settle_tol.unwrap_or(base.tol),
            check_every: self.settle_check.unwrap_or(base.check_every),
            adaptive: self.adaptive || base.adaptive,
            ..base
        }
    }

    /// `base` with the options given on the command line (and this loss and seed).
    pub fn override_ep(&self, base: EpConfig, loss: Loss, seed: u64) -> EpConfig {
        EpConfig {
            beta: self.beta.unwrap_or(base.beta),
            nudging: self.nudging.unwrap_or(base.nudging),
            loss,
            settle: self.override_settle(base.settle),
            seed,
        }
    }

    /// The EP options with this loss and seed.
    pub fn ep(&self, loss: Loss, seed: u64) -> EpConfig {
        self.override_ep(EpConfig::default(), loss, seed)
    }

    /// The EqProp options.
    pub fn eqprop(&self) -> EqPropConfig {
        EqPropConfig {
            beta: self.beta.unwrap_or(1.0),
            random_sign: self.nudging.is_none_or(|n| n == Nudging::RandomSign),
            step: self.eqprop_step,
            free_steps: self.eqprop_free_steps,
            nudged_steps: self.eqprop_nudged_steps,
            init: if self.persistent {
                EqPropInit::Persistent
            } else {
                EqPropInit::Zero
            },
        }
    }
}

/// Gradient estimators selectable on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EstimatorArg {
    /// Backpropagation (burn autodiff).
    Backprop,
    /// Equilibrium propagation on the layered energy.
    Ep,
    /// Layer-local EP.
    LocalEp,
    /// Classic EqProp (Hopfield energy; needs a Linear-hsig-Linear chain).
    Eqprop,
}

impl EstimatorArg {
    /// The default loss of this estimator.
    pub fn default_loss(self) -> Loss {
        match self {
            Self::Backprop => Loss::CrossEntropy { smoothing: 0.0 },
            _ => Loss::default(),
        }
    }

    /// Builds the estimator for `net`.
    pub fn build(
        self,
        net: &mep::model::Network,
        loss: Loss,
        ep: &EpArgs,
        samples: usize,
        seed: u64,
    ) -> Result<Box<dyn GradientEstimator>> {
        Ok(match self {
            Self::Backprop => Box::new(BackpropEstimator::new(loss)?.with_dropout_seed(seed)),
            Self::Ep => Box::new(EpEstimator::new(net, ep.ep(loss, seed))?),
            Self::LocalEp => Box::new(EpEstimator::local(net, ep.ep(loss, seed))?),
            Self::Eqprop => Box::new(EqPropEstimator::new(net, ep.eqprop(), samples, seed)?),
        })
    }
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
    let model = args
        .model
        .builder(Shape::from_chw(dataset.input_shape))?
        .build(globals.seed, &device)?;
    let config = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch,
        seed: globals.seed,
    };
    let setup = resolve(&args, &model, dataset.train.len(), globals.seed)?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("results/train").join(
            format!(
                "{}-{}-{}-seed{}",
                dataset.name.replace(':', "_"),
                args.model,
                setup.tag,
                globals.seed
            )
            .to_lowercase(),
        )
    });
    let mut run_config = serde_json::json!({
        "dataset": dataset.name,
        "model": args.model.to_string(),
        "train_samples": dataset.train.len(),
        "test_samples": dataset.test.len(),
        "device": globals.device.to_string(),
        "threads": mep::device::threads(),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "seed": config.seed,
    });
    if let (Some(obj), serde_json::Value::Object(extra)) =
        (run_config.as_object_mut(), setup.config)
    {
        obj.extend(extra);
    }
    let (estimator, optimizer) = (setup.estimator, setup.optimizer);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&run_config)?.as_bytes(),
    )?;

    eprintln!(
        "training {} ({} parameters) on {} ({} train / {} test) with {}, {} epochs, batch {}, device {}, {} threads",
        args.model,
        model.num_params(),
        dataset.name,
        dataset.train.len(),
        dataset.test.len(),
        setup.label,
        config.epochs,
        config.batch_size,
        globals.device,
        mep::device::threads()
    );
    let mut trainer = Trainer::new(model, estimator, optimizer, device);
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

/// The estimator and optimizer of a run, how its config records them, and labels.
struct Setup {
    estimator: Box<dyn GradientEstimator>,
    optimizer: Box<dyn Optimizer>,
    config: serde_json::Value,
    label: String,
    tag: String,
}

/// Builds the estimator and optimizer from a preset (with overrides) or from the
/// --estimator / --optimizer options.
fn resolve(args: &TrainArgs, model: &Network, samples: usize, seed: u64) -> Result<Setup> {
    if let Some(preset) = args.preset {
        let mut p = preset.config();
        match &mut p.estimator {
            EstimatorChoice::Backprop { loss } => *loss = args.loss.unwrap_or(*loss),
            EstimatorChoice::EqProp(c) => {
                let given = args.ep.eqprop();
                *c = EqPropConfig {
                    beta: args.ep.beta.unwrap_or(c.beta),
                    ..given
                };
            }
            other => {
                let c = other.ep_config_mut().expect("EP kinds");
                *c = args.ep.override_ep(*c, args.loss.unwrap_or(c.loss), seed);
            }
        }
        let o = &mut p.optimizer;
        o.lr = args.lr.unwrap_or(o.lr);
        o.momentum = args.momentum.unwrap_or(o.momentum);
        o.weight_decay = args.weight_decay.unwrap_or(o.weight_decay);
        o.seed = seed;
        let estimator = p.estimator.build(model, samples, seed)?;
        let optimizer = CompositeOptimizer::new(p.optimizer, model.param_info())?;
        let label = format!(
            "preset {preset} ({}, lr {})",
            estimator.name(),
            p.optimizer.lr
        );
        return Ok(Setup {
            config: serde_json::json!({
                "preset": preset.to_string(),
                "estimator": estimator.name(),
                "estimator_config": p.estimator,
                "optimizer": "composite",
                "composite": p.optimizer,
            }),
            estimator,
            optimizer: Box::new(optimizer),
            label,
            tag: preset.to_string(),
        });
    }
    let kind: OptimizerKind = args.optimizer.into();
    let lr = args.lr.unwrap_or(kind.default_lr());
    let momentum = args.momentum.unwrap_or(0.9);
    let weight_decay = args.weight_decay.unwrap_or(0.0);
    let optimizer = kind.build(lr, momentum, weight_decay)?;
    let loss = args.loss.unwrap_or(args.estimator.default_loss());
    let estimator = args.estimator.build(model, loss, &args.ep, samples, seed)?;
    let label = format!("{}+{kind:?} ({loss} loss), lr {lr}", estimator.name());
    let config = serde_json::json!({
        "estimator": args.estimator,
        "loss": loss.to_string(),
        "ep": matches!(args.estimator, EstimatorArg::Ep | EstimatorArg::LocalEp)
            .then(|| args.ep.ep(loss, seed)),
        "eqprop": (args.estimator == EstimatorArg::Eqprop).then(|| args.ep.eqprop()),
        "optimizer": kind,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
    });
    Ok(Setup {
        estimator,
        optimizer,
        config,
        label,
        tag: format!("{:?}-{kind:?}", args.estimator),
    })
}

/// Loads a data set; if its files are missing and it can be downloaded, fetches it into the
/// user cache first (unless `fetch` is false).
pub(super) fn load_or_fetch(
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
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
