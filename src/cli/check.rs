//! `mep check-gradient`: EP (or local EP, or EqProp) against backprop on real data.

use anyhow::{Context, Result};
use clap::Args;
use mep::data::DataLocator;
use mep::device::{Precision, Workload};
use mep::estimate::Nudging;
use mep::experiment::check::{FIXED_POINT_RESIDUAL, GradientCheck};
use mep::experiment::{EstimatorArg, Standardize};
use mep::loss::Loss;

use super::Globals;
use super::progress::DownloadBar;

/// The library's defaults of a gradient check: the one home of every default below.
fn defaults() -> GradientCheck {
    GradientCheck::default()
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Model spec (for eqprop a Linear-hsig-Linear chain such as 784-500-hsig-10)
    /// [default: the --checkpoint run's, else 784-256-128-10].
    #[arg(long)]
    model: Option<String>,
    /// Data set whose first training samples form the batch [default: the --checkpoint
    /// run's, else mnist].
    #[arg(long)]
    dataset: Option<String>,
    /// Samples in the batch.
    #[arg(long, default_value_t = defaults().batch)]
    batch: usize,
    /// Nudge strength.
    #[arg(long, default_value_t = defaults().beta)]
    beta: f32,
    /// Nudging: centered, one-sided or random.
    #[arg(long, default_value_t = defaults().nudging, value_parser = parse_nudging)]
    nudging: Nudging,
    /// Settle steps per phase (EqProp: free and nudged steps).
    #[arg(long, default_value_t = defaults().steps)]
    steps: usize,
    /// Settle step size (EqProp: its state step).
    #[arg(long, default_value_t = defaults().settle_lr)]
    settle_lr: f32,
    /// Settle tolerance, in units of beta.
    #[arg(long, default_value_t = defaults().tol)]
    tol: f32,
    /// Heavy-ball momentum of settling.
    #[arg(long, default_value_t = defaults().settle_momentum)]
    settle_momentum: f32,
    /// Settle step following the energy's curvature (at most --settle-lr), as `mep train
    /// --settle-curvature`.
    #[arg(long)]
    settle_curvature: bool,
    /// Precision of EP's free phase, settling and contrast (f32, bf16 or f16); the backprop
    /// reference stays in f32, so the comparison shows what the precision costs.
    #[arg(long, default_value_t = defaults().precision)]
    precision: Precision,
    /// Estimator to check: ep, local-ep or eqprop (backprop is the reference).
    #[arg(long, value_enum, default_value_t = defaults().estimator)]
    estimator: EstimatorArg,
    /// Loss of both EP's nudge and the backprop reference.
    #[arg(long, default_value_t = defaults().loss)]
    loss: Loss,
    /// Input normalisation, as `mep train --standardize` (default: the data set's own).
    #[arg(long, value_name = "MEAN,STD|dataset|none", default_value_t = defaults().standardize)]
    standardize: Standardize,
    /// Divide each layer's EP gradient by its attenuation in a truncated settle (plain
    /// steps: --settle-momentum 0 --tol 0), as `mep train --rescale`.
    #[arg(long)]
    rescale: bool,
    /// Weights from a training checkpoint (a run directory or its checkpoint.safetensors)
    /// instead of the initialisation; the model and data set default to the run's.
    #[arg(long, value_name = "PATH")]
    checkpoint: Option<std::path::PathBuf>,
    /// Do not download a missing data set.
    #[arg(long)]
    no_fetch: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: CheckArgs, globals: &Globals) -> Result<()> {
    let base = match &args.checkpoint {
        Some(path) => GradientCheck::on_checkpoint(path)
            .with_context(|| format!("reading the run of {}", path.display()))?,
        None => defaults(),
    };
    let check = GradientCheck {
        model: args.model.unwrap_or(base.model),
        dataset: args.dataset.unwrap_or(base.dataset),
        batch: args.batch,
        beta: args.beta,
        nudging: args.nudging,
        steps: args.steps,
        settle_lr: args.settle_lr,
        tol: args.tol,
        settle_momentum: args.settle_momentum,
        curvature: args.settle_curvature,
        precision: args.precision,
        estimator: args.estimator,
        loss: args.loss,
        standardize: args.standardize,
        checkpoint: args.checkpoint,
        rescale: args.rescale,
    };
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let device = globals.device.resolve(Workload::Settle)?;
    let report = check.run(
        globals.seed,
        &device,
        &locator,
        !args.no_fetch,
        &mut DownloadBar::default(),
    )?;
    if let Some(residual) = report.free_residual
        && residual > FIXED_POINT_RESIDUAL
    {
        errln!(
            "warning: the free phase has not reached its fixed point (residual {residual:.2e}); the implicit gradient is only meaningful there: raise --steps"
        );
    }
    if args.json {
        outln!("{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    let label = match check.estimator {
        EstimatorArg::LocalEp => "local EP",
        EstimatorArg::Eqprop => "EqProp",
        _ => "EP",
    };
    let precision = match check.precision {
        Precision::F32 => String::new(),
        p => format!(", in {p}"),
    };
    outln!(
        "{label} gradient ({} nudging, beta {}, {} steps{precision}) vs {}: {} on a batch of {} from {}",
        check.nudging,
        check.beta,
        check.steps,
        report.reference,
        report.model,
        check.batch,
        report.dataset
    )?;
    outln!("{:<16} {:>10} {:>11}", "parameter", "cosine", "norm ratio")?;
    for r in &report.params {
        outln!("{:<16} {:>10.6} {:>11.5}", r.name, r.cosine, r.norm_ratio)?;
    }
    if let Some(r) = report.free_residual {
        outln!("free phase fixed-point residual {r:.3e}")?;
    }
    for (i, s) in report.settle.iter().enumerate() {
        outln!(
            "phase {}: {} settle steps of {:.3}, residual {:.3e}{}",
            i + 1,
            s.steps,
            s.step,
            s.residual,
            if s.converged { " (converged)" } else { "" }
        )?;
    }
    Ok(())
}

/// Parses `--nudging`.
fn parse_nudging(s: &str) -> Result<Nudging, String> {
    s.parse()
        .map_err(|e: mep::estimate::EstimateError| e.to_string())
}
