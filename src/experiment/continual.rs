//! Continual-learning experiments on permuted tasks: one method ([`ContinualMethod`], what
//! `mep continual` runs) and the five-method comparison ([`ContinualBench`], `mep bench
//! continual`), with their outcomes, tables and charts.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::write_atomic;
use super::{DEFAULT_MODEL, ExperimentError, Standardize, TrainOptions, build_network};
use crate::bench::plot::{PlotError, Series, heat_map, line_chart};
use crate::continual::{
    self, ContinualConfig, ContinualObserver, Ewc, EwcConfig, EwcCoupling, EwcSetup, PermutedTasks,
    TaskReport,
};
use crate::data::download::DownloadProgress;
use crate::data::{DataLocator, Dataset};
use crate::device::Device;
use crate::train::Trainer;

/// One method of a continual-learning run: training options and optional EWC.
#[derive(Debug, Clone)]
pub struct ContinualMethod {
    /// Name in tables and charts.
    pub label: String,
    /// Training options (epochs are per task).
    pub options: TrainOptions,
    /// Elastic weight consolidation, if any.
    pub ewc: Option<EwcConfig>,
}

impl ContinualMethod {
    /// A method named after its options: the preset (or `custom`), `+ef` with error
    /// feedback, `+ewcLAMBDA` (`d` when decoupled) with EWC.
    pub fn new(options: TrainOptions, ewc: Option<EwcConfig>) -> Self {
        let label = format!(
            "{}{}{}",
            options.preset.as_deref().unwrap_or("custom"),
            if options.error_feedback.is_some() {
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
        Self {
            label,
            options,
            ewc,
        }
    }

    /// Checks the options and the EWC settings.
    pub fn validate(&self) -> Result<(), ExperimentError> {
        self.options.validate()?;
        if let Some(c) = self.ewc {
            Ewc::new(c).map_err(|e| ExperimentError::InvalidOption(e.to_string()))?;
        }
        Ok(())
    }

    /// Trains this method on `tasks` permuted tasks of `base` (task 0: `base` itself) with
    /// one model and optimizer, seeded from `seed`.
    pub fn run(
        &self,
        base: &Dataset,
        tasks: usize,
        seed: u64,
        device: &Device,
        observer: &mut dyn ContinualObserver,
    ) -> Result<ContinualOutcome, ExperimentError> {
        check_tasks(tasks)?;
        let opts = &self.options;
        let config = opts.train_config(seed)?;
        let spec = opts.model()?;
        let model = build_network(&spec, base, seed, device)?;
        // The schedule (if any) spans the whole sequence: tasks x epochs x batches.
        let samples = base.train.len() * tasks;
        let recipe = opts.recipe(samples)?;
        let (estimator, optimizer) = recipe.build(&model, samples, seed)?;
        let ewc = match self.ewc {
            Some(c) => Some(EwcSetup {
                ewc: Ewc::new(c).map_err(|e| ExperimentError::InvalidOption(e.to_string()))?,
                // A second, identical estimator: the Fisher's per-sample gradients must not
                // advance the training estimator's random streams.
                estimator: recipe.build(&model, samples, seed)?.0,
            }),
            None => None,
        };
        let mut trainer = Trainer::new(model, estimator, optimizer, device.clone());
        let sequence = PermutedTasks::new(base.clone(), tasks, seed);
        let run_config = ContinualConfig {
            train: config.clone(),
            eval_batch: config.batch_size.max(256),
        };
        let report =
            continual::run(&mut trainer, &sequence, &run_config, ewc, observer).map_err(|e| {
                ExperimentError::Continual {
                    method: self.label.clone(),
                    hint: match self.ewc {
                        Some(e) if e.coupling == EwcCoupling::Gradient => {
                            " (an EWC gradient step is only stable while lr * lambda * Fisher stays small: try --ewc-coupling decoupled or a smaller --ewc)"
                        }
                        _ => "",
                    },
                    source: Box::new(e),
                }
            })?;
        let m = &report.matrix;
        Ok(ContinualOutcome {
            method: self.label.clone(),
            dataset: base.name.clone(),
            model: opts.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
            tasks,
            seed,
            options: opts.clone(),
            optimizer: serde_json::to_value(recipe).unwrap_or_default(),
            ewc: self.ewc,
            accuracy_matrix: m.square(),
            average_accuracy: m.average_accuracy(),
            average_forgetting: m.average_forgetting(),
            backward_transfer: m.backward_transfer(),
            average_accuracy_curve: (0..m.tasks()).filter_map(|i| m.average_after(i)).collect(),
            seconds: report.seconds,
            task_reports: report.tasks,
        })
    }
}

/// What `mep continual --json` prints and results.json holds for one method.
#[derive(Debug, Clone, Serialize)]
pub struct ContinualOutcome {
    /// The method's label.
    pub method: String,
    /// The base data set.
    pub dataset: String,
    /// The model spec.
    pub model: String,
    /// Number of tasks.
    pub tasks: usize,
    /// Seed.
    pub seed: u64,
    /// Training options.
    pub options: TrainOptions,
    /// The resolved recipe.
    pub optimizer: serde_json::Value,
    /// EWC settings.
    pub ewc: Option<EwcConfig>,
    /// Rows: after task i; columns: task j (null where task j was not yet seen).
    pub accuracy_matrix: Vec<Vec<Option<f64>>>,
    /// Mean final accuracy over tasks.
    pub average_accuracy: Option<f64>,
    /// Mean of best earlier accuracy minus final accuracy.
    pub average_forgetting: Option<f64>,
    /// Mean of final minus just-trained accuracy.
    pub backward_transfer: Option<f64>,
    /// Average accuracy over the tasks seen after each task.
    pub average_accuracy_curve: Vec<f64>,
    /// Wall time.
    pub seconds: f64,
    /// Per-task reports.
    pub task_reports: Vec<TaskReport>,
}

fn check_tasks(tasks: usize) -> Result<(), ExperimentError> {
    if tasks == 0 {
        return Err(ExperimentError::InvalidOption(
            "--tasks must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Loads the base data set whose permutations are the tasks (an image data set, not
/// `permuted-mnist` itself).
pub fn load_base(
    options: &TrainOptions,
    seed: u64,
    locator: &DataLocator,
    fetch: bool,
    progress: &mut dyn DownloadProgress,
) -> Result<Dataset, ExperimentError> {
    if options.dataset().starts_with("permuted-mnist") {
        return Err(ExperimentError::InvalidOption(
            "--dataset names the base data set whose permutations are the tasks (mnist or fashion-mnist), not permuted-mnist".into(),
        ));
    }
    let base = options.load_data(locator, seed, fetch, progress)?;
    if base.input_shape[0] != 1 || base.input_dim() < 2 {
        return Err(ExperimentError::InvalidOption(format!(
            "permuted tasks need image data; {} has inputs {:?}",
            base.name, base.input_shape
        )));
    }
    Ok(base)
}

/// Writes one method's `results.json` and charts into `dir` (created); returns the
/// number of chart files.
pub fn write_outcome(dir: &Path, outcome: &ContinualOutcome) -> Result<usize, ExperimentError> {
    std::fs::create_dir_all(dir).map_err(|e| ExperimentError::io("creating", dir, e))?;
    let text = serde_json::to_string_pretty(outcome).unwrap_or_default();
    write_atomic(&dir.join("results.json"), text.as_bytes())?;
    Ok(charts(dir, std::slice::from_ref(outcome))?.len())
}

/// Heat maps of each method's accuracy matrix and one chart of average accuracy vs tasks.
fn charts(dir: &Path, results: &[ContinualOutcome]) -> Result<Vec<PathBuf>, PlotError> {
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
    Ok(files)
}

/// A percentage with two decimals, or `-`.
pub fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.2}", 100.0 * v))
}

/// The five-method comparison of `mep bench continual`: EP, EP with error feedback, EP
/// with EWC, backprop and backprop with EWC, on the same tasks and seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContinualBench {
    /// Number of tasks (3 when `quick`).
    pub tasks: usize,
    /// EWC strength of the EP+EWC run.
    pub ep_ewc: f64,
    /// EWC strength of the backprop+EWC run.
    pub bp_ewc: f64,
    /// EWC coupling of the EP+EWC run.
    pub ep_coupling: EwcCoupling,
    /// EWC coupling of the backprop+EWC run.
    pub bp_coupling: EwcCoupling,
    /// Fisher samples per task.
    pub fisher_samples: usize,
    /// 3 tasks of 2000 training and 1000 test samples.
    pub quick: bool,
}

impl Default for ContinualBench {
    /// 10 tasks, EWC 1e4 (EP) and 1e3 (backprop), both decoupled, 1000 Fisher samples.
    fn default() -> Self {
        Self {
            tasks: 10,
            ep_ewc: 1e4,
            bp_ewc: 1e3,
            ep_coupling: EwcCoupling::Decoupled,
            bp_coupling: EwcCoupling::Decoupled,
            fisher_samples: 1000,
            quick: false,
        }
    }
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

/// Inputs stay in [0, 1] (`standardize: none`), as the bench was tuned and measured:
/// standardised, EP with momentum SGD at lr 0.05 diverges within the first batches. The
/// recipes' own choice ([`super::Recipe::standardize`]) is the same; the bench names it.
fn bench_options(preset: &str, train: Option<usize>, test: Option<usize>) -> TrainOptions {
    TrainOptions {
        preset: Some(preset.into()),
        standardize: Some(Standardize::None),
        dataset: Some("mnist".into()),
        epochs: Some(1),
        batch: Some(64),
        train_samples: train,
        test_samples: test,
        ..TrainOptions::default()
    }
}

/// A finished comparison.
#[derive(Debug, Clone)]
pub struct ContinualBenchResults {
    /// Every method for every seed.
    pub outcomes: Vec<ContinualOutcome>,
    /// The content of `results.json`.
    pub json: serde_json::Value,
    /// The content of `table.md`.
    pub table: String,
    first_seed: u64,
}

impl ContinualBenchResults {
    /// Writes `results.json`, `table.md` and the first seed's charts into `dir`; returns
    /// the number of charts.
    pub fn write(&self, dir: &Path) -> Result<usize, ExperimentError> {
        std::fs::create_dir_all(dir).map_err(|e| ExperimentError::io("creating", dir, e))?;
        let text = serde_json::to_string_pretty(&self.json).unwrap_or_default();
        write_atomic(&dir.join("results.json"), text.as_bytes())?;
        write_atomic(&dir.join("table.md"), self.table.as_bytes())?;
        let first: Vec<ContinualOutcome> = self
            .outcomes
            .iter()
            .filter(|r| r.seed == self.first_seed)
            .cloned()
            .collect();
        Ok(charts(dir, &first)?.len())
    }
}

/// Progress of the comparison: which method starts, then its tasks.
pub trait ContinualBenchObserver: ContinualObserver {
    /// Run `index` (1-based) of `total` starts.
    fn method_start(&mut self, _index: usize, _total: usize, _method: &str, _seed: u64) {}
    /// Where download progress goes.
    fn download(&mut self) -> &mut dyn DownloadProgress;
}

impl ContinualBench {
    /// The tasks this comparison trains.
    pub fn task_count(&self) -> usize {
        if self.quick { 3 } else { self.tasks }
    }

    /// The five methods.
    pub fn methods(&self) -> Vec<ContinualMethod> {
        let (train, test) = if self.quick {
            (Some(2000), Some(1000))
        } else {
            (None, None)
        };
        let ewc = |lambda, coupling| EwcConfig {
            lambda,
            decay: 1.0,
            fisher_samples: self.fisher_samples,
            coupling,
        };
        let ep = ep_options(train, test);
        let bp = bench_options("sgd", train, test);
        let method = |label: &str, options: TrainOptions, ewc: Option<EwcConfig>| ContinualMethod {
            label: label.into(),
            options,
            ewc,
        };
        vec![
            method("ep", ep.clone(), None),
            method(
                "ep+ef",
                TrainOptions {
                    error_feedback: Some(0.9),
                    ..ep.clone()
                },
                None,
            ),
            method("ep+ewc", ep, Some(ewc(self.ep_ewc, self.ep_coupling))),
            method("backprop", bp.clone(), None),
            method("backprop+ewc", bp, Some(ewc(self.bp_ewc, self.bp_coupling))),
        ]
    }

    /// Runs every method for every seed on permuted MNIST.
    pub fn run(
        &self,
        seeds: &[u64],
        locator: &DataLocator,
        fetch: bool,
        device: &Device,
        observer: &mut dyn ContinualBenchObserver,
    ) -> Result<ContinualBenchResults, ExperimentError> {
        let tasks = self.task_count();
        check_tasks(tasks)?;
        let methods = self.methods();
        for m in &methods {
            m.validate()?;
        }
        let first_seed = *seeds.first().ok_or_else(|| {
            ExperimentError::InvalidOption("--seeds needs at least one seed".into())
        })?;
        let base = load_base(
            &methods[0].options,
            first_seed,
            locator,
            fetch,
            observer.download(),
        )?;
        let mut outcomes = Vec::new();
        let total = methods.len() * seeds.len();
        for &seed in seeds {
            for m in &methods {
                observer.method_start(outcomes.len() + 1, total, &m.label, seed);
                outcomes.push(m.run(&base, tasks, seed, device, observer)?);
            }
        }
        let summary: Vec<serde_json::Value> = outcomes
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
            "quick": self.quick,
            "tasks": tasks,
            "seeds": seeds,
            "threads": crate::device::threads(),
            "summary": summary,
            "runs": outcomes,
        });
        let mut table = format!(
            "# continual: permuted {} ({tasks} tasks{})\n\n| method | seed | average accuracy % | average forgetting % | backward transfer % | seconds |\n|---|---|---|---|---|---|\n",
            base.name,
            if self.quick { ", quick" } else { "" }
        );
        for r in &outcomes {
            table.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.0} |\n",
                r.method,
                r.seed,
                pct(r.average_accuracy),
                pct(r.average_forgetting),
                pct(r.backward_transfer),
                r.seconds
            ));
        }
        Ok(ContinualBenchResults {
            outcomes,
            json,
            table,
            first_seed,
        })
    }
}
