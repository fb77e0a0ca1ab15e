//! `mep continual` (one method on permuted MNIST) and `mep bench continual` (EP, EP with
//! error feedback, EP with EWC, backprop and backprop with EWC, same seeds).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mep::continual::{ContinualObserver, EwcConfig, EwcCoupling, TaskReport};
use mep::data::download::DownloadProgress;
use mep::data::{DataLocator, Dataset};
use mep::device::Workload;
use mep::experiment::TrainOptions;
use mep::experiment::continual::{
    ContinualBench, ContinualBenchObserver, ContinualMethod, load_base, pct, write_outcome,
};
use mep::train::{EpochMetrics, TrainObserver};

use super::Globals;
use super::progress::DownloadBar;

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

/// Progress: one bar per epoch of each task, a line per finished task.
struct TaskBar {
    bar: Option<ProgressBar>,
    task: usize,
    tasks: usize,
    quiet: bool,
    download: DownloadBar,
}

impl TaskBar {
    fn new(quiet: bool) -> Self {
        Self {
            bar: None,
            task: 0,
            tasks: 0,
            quiet,
            download: DownloadBar::default(),
        }
    }
}

impl ContinualBenchObserver for TaskBar {
    fn method_start(&mut self, index: usize, total: usize, method: &str, seed: u64) {
        errln!("[{index}/{total}] {method} seed {seed}");
    }

    fn download(&mut self) -> &mut dyn DownloadProgress {
        &mut self.download
    }
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
        errln!(
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

pub fn run(args: ContinualArgs, globals: &Globals) -> Result<()> {
    let method = ContinualMethod::new(args.opts.clone(), args.ewc.config());
    method.validate()?;
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let base = load_base(
        &args.opts,
        globals.seed,
        &locator,
        !args.no_fetch,
        &mut DownloadBar::default(),
    )?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("results/continual").join(
            format!(
                "{}-{}tasks-{}-seed{}",
                base.name, args.tasks, method.label, globals.seed
            )
            .to_lowercase(),
        )
    });
    let device = globals.device.resolve(Workload::Backprop)?;
    announce(&method, &base, args.tasks)?;
    let mut bar = TaskBar::new(false);
    let result = method.run(&base, args.tasks, globals.seed, &device, &mut bar)?;
    let charts = write_outcome(&out, &result)?;
    errln!(
        "average accuracy {}%, average forgetting {}%, backward transfer {}%, {:.0}s; results in {} ({charts} charts)",
        pct(result.average_accuracy),
        pct(result.average_forgetting),
        pct(result.backward_transfer),
        result.seconds,
        out.display()
    );
    if args.json {
        outln!("{}", serde_json::to_string(&result)?)?;
    }
    Ok(())
}

/// The line that says what a method trains.
fn announce(method: &ContinualMethod, base: &Dataset, tasks: usize) -> Result<()> {
    let opts = &method.options;
    let config = opts.train_config(0)?;
    let recipe = opts.recipe(base.train.len() * tasks)?;
    errln!(
        "{}: {tasks} tasks of {} ({} train / {} test each), {}, {}, {} epochs per task, batch {}{}",
        method.label,
        base.name,
        base.train.len(),
        base.test.len(),
        opts.model()?,
        recipe.label(),
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
    Ok(())
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

pub fn bench(args: BenchContinualArgs, globals: &Globals) -> Result<()> {
    let bench = ContinualBench {
        tasks: args.tasks,
        ep_ewc: args.ep_ewc,
        bp_ewc: args.bp_ewc,
        ep_coupling: args.ep_ewc_coupling.into(),
        bp_coupling: args.bp_ewc_coupling.into(),
        fisher_samples: args.fisher_samples,
        quick: args.suite.quick,
    };
    let seeds = args
        .suite
        .seeds
        .clone()
        .unwrap_or_else(|| vec![globals.seed]);
    let dir = args
        .suite
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("results/continual"));
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let device = globals.device.resolve(Workload::Backprop)?;
    let mut bar = TaskBar::new(false);
    let mut results = bench
        .run(&seeds, &locator, !args.suite.no_fetch, &device, &mut bar)
        .context("bench continual")?;
    if let Some(obj) = results.json.as_object_mut() {
        obj.insert("device".into(), globals.device.to_string().into());
    }
    let n = results.write(&dir)?;
    err!("{}", results.table);
    errln!(
        "results in {} (results.json, table.md, {n} charts)",
        dir.display()
    );
    if args.suite.json {
        outln!("{}", serde_json::to_string(&results.json)?)?;
    }
    Ok(())
}
