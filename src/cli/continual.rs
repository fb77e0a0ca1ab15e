//! `mep continual` (one method on permuted MNIST) and `mep bench continual` (EP, EP with
//! error feedback, EP with EWC, backprop and backprop with EWC, same seeds).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mep::bench::plot::{Series, heat_map, line_chart};
use mep::continual::{
    self, ContinualConfig, ContinualObserver, ContinualReport, Ewc, EwcConfig, EwcCoupling,
    EwcSetup, PermutedTasks, TaskReport,
};
use mep::data::{DataLocator, Dataset};
use mep::device::Workload;
use mep::train::{EpochMetrics, TrainObserver, Trainer};
use serde::Serialize;

use super::Globals;
use super::options::{TrainOptions, build_network, load_or_fetch, setup};
use mep::experiment::write_atomic;

/// EWC flags.
#[derive(Debug, Clone, Args)]
pub struct EwcArgs {
    /// Elastic weight consolidation with this strength lambda (off without it).
    #[arg(long, value_name = "LAMBDA")]
    ewc: Option<f64>,
    /// EWC decay of earlier tasks' penalties per task: 1 keeps every task's penalty
    /// (multi-task EWC), below 1 is online EWC.
    #[arg(long, value_name = "GAMMA", default_value_t = 1.0, requires = "ewc")]
    ewc_decay: f64,
    /// Training samples of each finished task whose per-sample gradients give its Fisher.
    #[arg(long, value_name = "N", default_value_t = 1000, requires = "ewc")]
    fisher_samples: usize,
    /// How the penalty enters training: its gradient is added to the estimated gradient,
    /// or (decoupled) its proximal map follows every optimizer step.
    #[arg(long, value_enum, default_value_t = CouplingArg::Gradient, requires = "ewc")]
    ewc_coupling: CouplingArg,
}

/// [`EwcCoupling`] on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CouplingArg {
    /// Add the penalty's gradient to the estimated gradient.
    Gradient,
    /// Apply the penalty's proximal map after each optimizer step.
    Decoupled,
}

impl From<CouplingArg> for EwcCoupling {
    fn from(c: CouplingArg) -> Self {
        match c {
            CouplingArg::Gradient => EwcCoupling::Gradient,
            CouplingArg::Decoupled => EwcCoupling::Decoupled,
        }
    }
}

impl EwcArgs {
    fn config(&self) -> Option<EwcConfig> {
        self.ewc.map(|lambda| EwcConfig {
            lambda,
            decay: self.ewc_decay,
            fisher_samples: self.fisher_samples,
            coupling: self.ewc_coupling.into(),
        })
    }
}

#[derive(Debug, Args)]
pub struct ContinualArgs {
    /// Number of tasks: task 0 is the data set itself, task k > 0 a seeded pixel
    /// permutation of it.
    #[arg(long, default_value_t = 10)]
    tasks: usize,
    #[command(flatten)]
    ewc: EwcArgs,
    /// Training options (--preset, --epochs per task, --batch, --error-feedback, ...).
    #[command(flatten)]
    opts: TrainOptions,
    /// Directory for results.json and the charts (default results/continual/<run>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Do not download a missing data set.
    #[arg(long)]
    no_fetch: bool,
    /// Print the results as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// One method of a continual-learning comparison.
#[derive(Debug, Clone)]
struct Method {
    label: String,
    opts: TrainOptions,
    ewc: Option<EwcConfig>,
}

/// What `mep continual --json` prints and results.json holds.
#[derive(Debug, Serialize)]
struct Outcome {
    method: String,
    dataset: String,
    model: String,
    tasks: usize,
    seed: u64,
    options: TrainOptions,
    optimizer: serde_json::Value,
    ewc: Option<EwcConfig>,
    /// Rows: after task i; columns: task j (null where task j was not yet seen).
    accuracy_matrix: Vec<Vec<Option<f64>>>,
    average_accuracy: Option<f64>,
    average_forgetting: Option<f64>,
    backward_transfer: Option<f64>,
    /// Average accuracy over the tasks seen after each task.
    average_accuracy_curve: Vec<f64>,
    seconds: f64,
    task_reports: Vec<TaskReport>,
}

/// Progress: one bar per epoch of each task, a line per finished task.
struct TaskBar {
    bar: Option<ProgressBar>,
    task: usize,
    tasks: usize,
    quiet: bool,
}

impl TrainObserver for TaskBar {
    fn epoch_start(&mut self, _epoch: usize, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "task {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", self.task, self.tasks));
        self.bar = Some(bar);
    }

    fn batch_end(&mut self, _loss: f32, _correct: usize, _samples: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn epoch_end(&mut self, _m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl ContinualObserver for TaskBar {
    fn task_start(&mut self, task: usize, tasks: usize) {
        self.task = task;
        self.tasks = tasks;
    }

    fn fisher_start(&mut self, _task: usize, samples: usize) {
        let bar = ProgressBar::new_spinner();
        bar.set_message(format!("Fisher on {samples} samples"));
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        self.bar = Some(bar);
    }

    fn task_end(&mut self, r: &TaskReport) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.quiet {
            return;
        }
        let accs: Vec<String> = r
            .accuracies
            .iter()
            .map(|a| format!("{:.1}", 100.0 * a))
            .collect();
        let mean = r.accuracies.iter().sum::<f64>() / r.accuracies.len() as f64;
        let secs: f64 = r.epochs.iter().map(|m| m.seconds).sum();
        let settle = r
            .epochs
            .last()
            .and_then(|m| Some((m.settle_steps_mean?, m.settle_residual_mean?)))
            .map(|(steps, res)| format!("  settle {steps:.1} steps, residual {res:.3}"))
            .unwrap_or_default();
        eprintln!(
            "task {:>2}: mean {:5.2}%  [{}]{settle}  {:.1}s{}",
            r.task,
            100.0 * mean,
            accs.join(" "),
            secs,
            r.fisher_seconds
                .map(|s| format!(" + Fisher {s:.1}s"))
                .unwrap_or_default()
        );
    }
}

/// Trains `method` on `tasks` tasks of `base` and returns its outcome.
fn run_method(
    method: &Method,
    base: &Dataset,
    tasks: usize,
    seed: u64,
    globals: &Globals,
    quiet: bool,
) -> Result<Outcome> {
    let opts = &method.opts;
    let config = opts.train_config(seed)?;
    let device = globals.device.resolve(Workload::Backprop)?;
    let spec = opts.model()?;
    let model = build_network(&spec, base, seed, &device)?;
    // The schedule (if any) spans the whole sequence: tasks x epochs x batches.
    let samples = base.train.len() * tasks;
    let built = setup(opts, &model, samples, seed)?;
    let ewc = match method.ewc {
        Some(c) => Some(EwcSetup {
            ewc: Ewc::new(c)?,
            // A second, identical estimator: the Fisher's per-sample gradients must not
            // advance the training estimator's random streams.
            estimator: setup(opts, &model, samples, seed)?.estimator,
        }),
        None => None,
    };
    if !quiet {
        eprintln!(
            "{}: {tasks} tasks of {} ({} train / {} test each), {spec}, {}, {} epochs per task, batch {}{}",
            method.label,
            base.name,
            base.train.len(),
            base.test.len(),
            built.label,
            config.epochs,
            config.batch_size,
            method
                .ewc
                .map(|e| format!(
                    ", EWC lambda {} decay {} ({:?}) on {} samples",
                    e.lambda, e.decay, e.coupling, e.fisher_samples
                ))
                .unwrap_or_default()
        );
    }
    let optimizer = serde_json::to_value(built.recipe)?;
    let mut trainer = Trainer::new(model, built.estimator, built.optimizer, device);
    let sequence = PermutedTasks::new(base.clone(), tasks, seed);
    let run_config = ContinualConfig {
        train: config.clone(),
        eval_batch: config.batch_size.max(256),
    };
    let mut bar = TaskBar {
        bar: None,
        task: 0,
        tasks,
        quiet,
    };
    let report = continual::run(&mut trainer, &sequence, &run_config, ewc, &mut bar)
        .with_context(|| {
            let hint = match method.ewc {
                Some(e) if e.coupling == EwcCoupling::Gradient => {
                    " (an EWC gradient step is only stable while lr * lambda * Fisher stays small: try --ewc-coupling decoupled or a smaller --ewc)"
                }
                _ => "",
            };
            format!("continual run {}{hint}", method.label)
        })?;
    Ok(outcome(method, base, tasks, seed, optimizer, report))
}

fn outcome(
    method: &Method,
    base: &Dataset,
    tasks: usize,
    seed: u64,
    optimizer: serde_json::Value,
    report: ContinualReport,
) -> Outcome {
    let m = &report.matrix;
    Outcome {
        method: method.label.clone(),
        dataset: base.name.clone(),
        model: method
            .opts
            .model
            .clone()
            .unwrap_or_else(|| "784-256-128-10".into()),
        tasks,
        seed,
        options: method.opts.clone(),
        optimizer,
        ewc: method.ewc,
        accuracy_matrix: m.square(),
        average_accuracy: m.average_accuracy(),
        average_forgetting: m.average_forgetting(),
        backward_transfer: m.backward_transfer(),
        average_accuracy_curve: (0..m.tasks()).filter_map(|i| m.average_after(i)).collect(),
        seconds: report.seconds,
        task_reports: report.tasks,
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.2}", 100.0 * v))
}

fn load_base(opts: &TrainOptions, globals: &Globals, no_fetch: bool) -> Result<Dataset> {
    if opts.dataset().starts_with("permuted-mnist") {
        bail!(
            "--dataset names the base data set whose permutations are the tasks (mnist or fashion-mnist), not permuted-mnist"
        );
    }
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let base = load_or_fetch(
        opts.dataset(),
        &locator,
        &opts.load_options()?,
        globals.seed,
        !no_fetch,
    )?;
    if base.input_shape[0] != 1 || base.input_dim() < 2 {
        bail!(
            "permuted tasks need image data; {} has inputs {:?}",
            base.name,
            base.input_shape
        );
    }
    Ok(base)
}

fn check_tasks(tasks: usize) -> Result<()> {
    if tasks == 0 {
        bail!("--tasks must be at least 1");
    }
    Ok(())
}

pub fn run(args: ContinualArgs, globals: &Globals) -> Result<()> {
    check_tasks(args.tasks)?;
    args.opts.validate()?;
    let ewc = args.ewc.config();
    if let Some(c) = ewc {
        Ewc::new(c)?;
    }
    let base = load_base(&args.opts, globals, args.no_fetch)?;
    let label = format!(
        "{}{}{}",
        args.opts.preset.as_deref().unwrap_or("custom"),
        if args.opts.error_feedback.is_some() {
            "+ef"
        } else {
            ""
        },
        ewc.map(|e| format!(
            "+ewc{}{}",
            e.lambda,
            if e.coupling == EwcCoupling::Decoupled {
                "d"
            } else {
                ""
            }
        ))
        .unwrap_or_default()
    );
    let method = Method {
        label: label.clone(),
        opts: args.opts.clone(),
        ewc,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("results/continual").join(
            format!(
                "{}-{}tasks-{label}-seed{}",
                base.name, args.tasks, globals.seed
            )
            .to_lowercase(),
        )
    });
    let result = run_method(&method, &base, args.tasks, globals.seed, globals, false)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    let charts = charts(&out, std::slice::from_ref(&result))?;
    eprintln!(
        "average accuracy {}%, average forgetting {}%, backward transfer {}%, {:.0}s; results in {} ({charts} charts)",
        pct(result.average_accuracy),
        pct(result.average_forgetting),
        pct(result.backward_transfer),
        result.seconds,
        out.display()
    );
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    }
    Ok(())
}

/// Heat maps of each method's accuracy matrix and one chart of average accuracy vs tasks.
fn charts(dir: &Path, results: &[Outcome]) -> Result<usize> {
    let mut files = Vec::new();
    for r in results {
        let stem = if results.len() == 1 {
            "accuracy_matrix".to_string()
        } else {
            format!("accuracy_matrix_{}", r.method.replace(['+', ' '], "_"))
        };
        files.extend(heat_map(
            &dir.join(stem),
            &format!("{}: test accuracy (%) on task j after task i", r.method),
            "evaluated task j",
            "after training task i",
            &r.accuracy_matrix,
        )?);
    }
    let series: Vec<Series> = results
        .iter()
        .map(|r| Series {
            label: r.method.clone(),
            points: r
                .average_accuracy_curve
                .iter()
                .enumerate()
                .map(|(i, a)| ((i + 1) as f64, 100.0 * a))
                .collect(),
        })
        .collect();
    files.extend(line_chart(
        &dir.join("average_accuracy"),
        "average accuracy over the tasks seen so far",
        "tasks trained",
        "test accuracy (%)",
        &series,
    )?);
    Ok(files.len())
}

#[derive(Debug, Args)]
pub struct BenchContinualArgs {
    /// Number of tasks.
    #[arg(long, default_value_t = 10)]
    tasks: usize,
    /// EWC strength of the EP+EWC run.
    #[arg(long, default_value_t = 1e4)]
    ep_ewc: f64,
    /// EWC strength of the backprop+EWC run.
    #[arg(long, default_value_t = 1e3)]
    bp_ewc: f64,
    /// EWC coupling of the EP+EWC run.
    #[arg(long, value_enum, default_value_t = CouplingArg::Decoupled)]
    ep_ewc_coupling: CouplingArg,
    /// EWC coupling of the backprop+EWC run.
    #[arg(long, value_enum, default_value_t = CouplingArg::Decoupled)]
    bp_ewc_coupling: CouplingArg,
    /// Fisher samples per task.
    #[arg(long, default_value_t = 1000)]
    fisher_samples: usize,
    /// `--quick` (3 tasks of 2000 training samples), `--seeds` (every method runs with
    /// each), `--out` (default results/continual), `--no-fetch`, `--json`.
    #[command(flatten)]
    suite: super::suites::SuiteArgs,
}

/// The bench's EP configuration: smep's estimator (one-sided beta 0.5, <= 30 settle
/// steps, MSE) with momentum SGD at lr 0.05 and no spectral bound. Muon (smep's own update)
/// moves every singular direction at the full rate until the schedule ends, so it rewrites a
/// task's weights within the next task (7% on task 0 after task 1, measured) and EWC must
/// freeze the network to stop it; SGD's steps shrink as a task is learned.
fn ep_options(train: Option<usize>, test: Option<usize>) -> TrainOptions {
    TrainOptions {
        update: Some("plain".into()),
        lr: Some(0.05),
        gamma: Some(0.0),
        ..bench_options("smep", train, test)
    }
}

fn bench_options(preset: &str, train: Option<usize>, test: Option<usize>) -> TrainOptions {
    TrainOptions {
        preset: Some(preset.into()),
        dataset: Some("mnist".into()),
        epochs: Some(1),
        batch: Some(64),
        train_samples: train,
        test_samples: test,
        ..TrainOptions::default()
    }
}

fn bench_methods(args: &BenchContinualArgs) -> Vec<Method> {
    let (train, test) = if args.suite.quick {
        (Some(2000), Some(1000))
    } else {
        (None, None)
    };
    let ewc = |lambda, coupling: CouplingArg| EwcConfig {
        lambda,
        decay: 1.0,
        fisher_samples: args.fisher_samples,
        coupling: coupling.into(),
    };
    let ep = ep_options(train, test);
    let bp = bench_options("sgd", train, test);
    vec![
        Method {
            label: "ep".into(),
            opts: ep.clone(),
            ewc: None,
        },
        Method {
            label: "ep+ef".into(),
            opts: TrainOptions {
                error_feedback: Some(0.9),
                ..ep.clone()
            },
            ewc: None,
        },
        Method {
            label: "ep+ewc".into(),
            opts: ep,
            ewc: Some(ewc(args.ep_ewc, args.ep_ewc_coupling)),
        },
        Method {
            label: "backprop".into(),
            opts: bp.clone(),
            ewc: None,
        },
        Method {
            label: "backprop+ewc".into(),
            opts: bp,
            ewc: Some(ewc(args.bp_ewc, args.bp_ewc_coupling)),
        },
    ]
}

pub fn bench(args: BenchContinualArgs, globals: &Globals) -> Result<()> {
    let tasks = if args.suite.quick { 3 } else { args.tasks };
    check_tasks(tasks)?;
    let methods = bench_methods(&args);
    for m in &methods {
        m.opts.validate()?;
        if let Some(c) = m.ewc {
            Ewc::new(c)?;
        }
    }
    let seeds = args
        .suite
        .seeds
        .clone()
        .unwrap_or_else(|| vec![globals.seed]);
    anyhow::ensure!(!seeds.is_empty(), "--seeds needs at least one seed");
    let dir = args
        .suite
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("results/continual"));
    let base = load_base(&methods[0].opts, globals, args.suite.no_fetch)?;
    let mut results = Vec::new();
    let total = methods.len() * seeds.len();
    for &seed in &seeds {
        for m in &methods {
            eprintln!("[{}/{total}] {} seed {seed}", results.len() + 1, m.label);
            results.push(run_method(m, &base, tasks, seed, globals, false)?);
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "method": r.method,
                "seed": r.seed,
                "average_accuracy": r.average_accuracy,
                "average_forgetting": r.average_forgetting,
                "backward_transfer": r.backward_transfer,
                "seconds": r.seconds,
            })
        })
        .collect();
    let json = serde_json::json!({
        "suite": "continual",
        "quick": args.suite.quick,
        "tasks": tasks,
        "seeds": seeds,
        "device": globals.device.to_string(),
        "threads": mep::device::threads(),
        "summary": summary,
        "runs": results,
    });
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let mut md = format!(
        "# continual: permuted {} ({tasks} tasks{})\n\n| method | seed | average accuracy % | average forgetting % | backward transfer % | seconds |\n|---|---|---|---|---|---|\n",
        base.name,
        if args.suite.quick { ", quick" } else { "" }
    );
    for r in &results {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} |\n",
            r.method,
            r.seed,
            pct(r.average_accuracy),
            pct(r.average_forgetting),
            pct(r.backward_transfer),
            r.seconds
        ));
    }
    write_atomic(&dir.join("table.md"), md.as_bytes())?;
    let first_seed: Vec<Outcome> = results.into_iter().filter(|r| r.seed == seeds[0]).collect();
    let n = charts(&dir, &first_seed)?;
    eprint!("{md}");
    eprintln!(
        "results in {} (results.json, table.md, {n} charts)",
        dir.display()
    );
    if args.suite.json {
        println!("{}", serde_json::to_string(&json)?);
    }
    Ok(())
}
