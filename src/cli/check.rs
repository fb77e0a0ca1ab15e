//! `mep check-gradient`: EP (or local EP, or EqProp) against backprop on real data.

use anyhow::{Result, bail};
use clap::Args;
use mep::data::{DataLocator, LoadOptions};
use mep::device::{Precision, Workload};
use mep::ep::{EqPropConfig, EqPropInit, EqPropModel, SettleConfig, SettleStats};
use mep::estimate::{
    BackpropEstimator, EpConfig, EpEstimator, GradientComparison, GradientEstimator, Nudging,
    TensorBatch, compare,
};
use mep::loss::Loss;
use mep::model::{ModelSpec, Shape};
use serde::Serialize;

use super::Globals;
use super::options::{EstimatorArg, load_or_fetch, parse_nudging};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Model spec (for eqprop a Linear-hsig-Linear chain such as 784-500-hsig-10).
    #[arg(long, default_value = "784-256-128-10")]
    model: ModelSpec,
    /// Data set whose first training samples form the batch.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Samples in the batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Nudge strength.
    #[arg(long, default_value_t = 0.01)]
    beta: f32,
    /// Nudging: centered, one-sided or random.
    #[arg(long, default_value = "centered", value_parser = parse_nudging)]
    nudging: Nudging,
    /// Settle steps per phase (EqProp: free and nudged steps).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Settle step size (EqProp: its state step).
    #[arg(long, default_value_t = 0.3)]
    settle_lr: f32,
    /// Settle tolerance, in units of beta.
    #[arg(long, default_value_t = 1e-5)]
    tol: f32,
    /// Heavy-ball momentum of settling.
    #[arg(long, default_value_t = 0.5)]
    settle_momentum: f32,
    /// Precision of EP's free phase, settling and contrast (f32, bf16 or f16); the backprop
    /// reference stays in f32, so the comparison shows what the precision costs.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Estimator to check: ep, local-ep or eqprop (backprop is the reference).
    #[arg(long, value_enum, default_value = "ep")]
    estimator: EstimatorArg,
    /// Loss of both EP's nudge and the backprop reference.
    #[arg(long, default_value = "mse")]
    loss: Loss,
    /// Do not download a missing data set.
    #[arg(long)]
    no_fetch: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    estimator: EstimatorArg,
    reference: &'static str,
    dataset: String,
    batch: usize,
    beta: f32,
    nudging: Nudging,
    precision: Precision,
    steps: usize,
    loss: String,
    seed: u64,
    params: Vec<GradientComparison>,
    settle: Vec<SettleStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    free_residual: Option<f32>,
}

pub fn run(args: CheckArgs, globals: &Globals) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let options = LoadOptions {
        train_samples: Some(args.batch),
        test_samples: Some(1),
        ..Default::default()
    };
    let data = load_or_fetch(
        &args.dataset,
        &locator,
        &options,
        globals.seed,
        !args.no_fetch,
    )?;
    if data.train.len() < args.batch {
        bail!(
            "data set {} has only {} training samples, fewer than --batch {}",
            data.name,
            data.train.len(),
            args.batch
        );
    }
    let device = globals.device.resolve(Workload::Settle)?;
    let net = args
        .model
        .build(Shape::from_chw(data.input_shape), globals.seed, &device)?;
    if net.output_shape().numel() != data.classes {
        bail!(
            "model {} has {} outputs but {} has {} classes",
            args.model,
            net.output_shape().numel(),
            data.name,
            data.classes
        );
    }
    let batch = TensorBatch::new(
        data.train.inputs(),
        data.train.labels(),
        data.classes,
        &device,
    );
    let settle = SettleConfig {
        lr: args.settle_lr,
        steps: args.steps,
        tol: args.tol,
        momentum: args.settle_momentum,
        check_every: 10,
        ..SettleConfig::default()
    };
    let ep_config = EpConfig {
        beta: args.beta,
        nudging: args.nudging,
        loss: args.loss,
        settle,
        seed: globals.seed,
        precision: args.precision,
    };
    let mut free_residual = None;
    let (estimate, reference, settle_stats, reference_name) = match args.estimator {
        EstimatorArg::Backprop => bail!("backprop is the reference; pick ep, local-ep or eqprop"),
        EstimatorArg::Ep | EstimatorArg::LocalEp => {
            let mut est: Box<dyn GradientEstimator> = if args.estimator == EstimatorArg::Ep {
                Box::new(EpEstimator::new(&net, ep_config)?)
            } else {
                Box::new(EpEstimator::local(&net, ep_config)?)
            };
            let e = est.estimate(&net, &batch)?;
            let r = BackpropEstimator::new(args.loss)?.estimate(&net, &batch)?;
            (e.grads, r.grads, e.settle, "backprop")
        }
        EstimatorArg::Eqprop => {
            if args.precision != Precision::F32 {
                bail!("--precision applies to the EP estimators (ep, local-ep)");
            }
            let config = EqPropConfig {
                beta: args.beta,
                random_sign: false,
                step: args.settle_lr,
                free_steps: args.steps,
                nudged_steps: args.steps,
                init: EqPropInit::Zero,
            };
            let model = EqPropModel::new(&net, config)?;
            let s0 = model.zero_states(batch.len(), &batch.x);
            let free = model.relax(&net, &batch.x, &batch.targets, s0, 0.0, args.steps);
            // A single random-sign draw: the sign is the seed's parity.
            let sign = match args.nudging {
                Nudging::RandomSign if globals.seed % 2 == 1 => -1.0,
                _ => 1.0,
            };
            let g = if args.nudging == Nudging::Centered {
                let plus = model.relax(
                    &net,
                    &batch.x,
                    &batch.targets,
                    free.clone(),
                    args.beta,
                    args.steps,
                );
                let minus = model.relax(
                    &net,
                    &batch.x,
                    &batch.targets,
                    free.clone(),
                    -args.beta,
                    args.steps,
                );
                EqPropModel::contrast(&batch.x, &minus, &plus, 2.0 * args.beta)
            } else {
                let b = sign * args.beta;
                let nudged =
                    model.relax(&net, &batch.x, &batch.targets, free.clone(), b, args.steps);
                EqPropModel::contrast(&batch.x, &free, &nudged, b)
            };
            let residual = model.free_residual(&net, &batch.x, &free);
            free_residual = Some(residual);
            if residual > 1e-4 {
                eprintln!(
                    "warning: the free phase has not reached its fixed point (residual {residual:.2e}); the implicit gradient is only meaningful there: raise --steps"
                );
            }
            let r = model.implicit_gradient(&net, &batch.x, &batch.targets, &free, 4 * args.steps);
            (
                g,
                r,
                Vec::new(),
                "implicit differentiation at the free fixed point",
            )
        }
    };
    let rows = compare(&net, &estimate, &reference);
    let report = Report {
        model: args.model.to_string(),
        estimator: args.estimator,
        reference: reference_name,
        dataset: data.name.clone(),
        batch: args.batch,
        beta: args.beta,
        nudging: args.nudging,
        precision: args.precision,
        steps: args.steps,
        loss: args.loss.to_string(),
        seed: globals.seed,
        params: rows,
        settle: settle_stats,
        free_residual,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let label = match args.estimator {
        EstimatorArg::LocalEp => "local EP",
        EstimatorArg::Eqprop => "EqProp",
        _ => "EP",
    };
    let precision = match args.precision {
        Precision::F32 => String::new(),
        p => format!(", in {p}"),
    };
    println!(
        "{label} gradient ({} nudging, beta {}, {} steps{precision}) vs {}: {} on a batch of {} from {}",
        args.nudging, args.beta, args.steps, reference_name, args.model, args.batch, data.name
    );
    println!("{:<16} {:>10} {:>11}", "parameter", "cosine", "norm ratio");
    for r in &report.params {
        println!("{:<16} {:>10.6} {:>11.5}", r.name, r.cosine, r.norm_ratio);
    }
    if let Some(r) = report.free_residual {
        println!("free phase fixed-point residual {r:.3e}");
    }
    for (i, s) in report.settle.iter().enumerate() {
        println!(
            "phase {}: {} settle steps, residual {:.3e}{}",
            i + 1,
            s.steps,
            s.residual,
            if s.converged { " (converged)" } else { "" }
        );
    }
    Ok(())
}
