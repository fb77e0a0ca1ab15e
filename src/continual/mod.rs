//! Continual learning: one model and one optimizer trained on a sequence of tasks, with the
//! accuracy on every task seen so far recorded after each, and EWC as an optional penalty.
//!
//! * [`TaskSequence`] hands out the tasks; [`PermutedTasks`] is permuted MNIST (task 0 the
//!   identity, then seeded pixel permutations).
//! * [`run`] trains the tasks in turn with a [`Trainer`], whose model, optimizer state and
//!   estimator persist across tasks, and fills an [`AccuracyMatrix`].
//! * [`Ewc`] is a [`crate::train::Penalty`]: after each task, [`diagonal_fisher`] estimates
//!   the task's diagonal empirical Fisher from per-sample gradients of any estimator
//!   (backprop or EP), and the penalty anchors the parameters with it.

mod ewc;
mod metrics;

pub use ewc::{Ewc, EwcConfig, EwcCoupling, diagonal_fisher};
pub use metrics::AccuracyMatrix;

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;

use crate::data::Dataset;
use crate::data::dataset::task_permutation;
use crate::estimate::GradientEstimator;
use crate::train::{EpochMetrics, TrainConfig, TrainError, TrainObserver, Trainer};

/// Errors of a continual-learning run.
#[derive(Debug, thiserror::Error)]
pub enum ContinualError {
    /// An option is out of range.
    #[error("invalid continual-learning option: {0}")]
    InvalidOption(String),
    /// Training or evaluation failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The Fisher estimate failed.
    #[error("estimating the Fisher of task {task}")]
    Fisher {
        /// The task (0-based).
        task: usize,
        /// What failed.
        source: crate::estimate::EstimateError,
    },
}

/// A sequence of tasks that share the model's input and output shapes.
pub trait TaskSequence {
    /// Number of tasks.
    fn len(&self) -> usize;

    /// Whether there is no task.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Task `t` (0-based) with its train and test split.
    fn task(&self, t: usize) -> Dataset;
}

/// Permuted MNIST (or any image data set): task `t` applies the pixel permutation
/// [`task_permutation`]`(dim, t, seed)` to both splits of the base data set; task 0 is the
/// base data set itself.
#[derive(Debug, Clone)]
pub struct PermutedTasks {
    base: Dataset,
    tasks: usize,
    seed: u64,
}

impl PermutedTasks {
    /// `tasks` tasks from `base` with permutations drawn from `seed`.
    pub fn new(base: Dataset, tasks: usize, seed: u64) -> Self {
        Self { base, tasks, seed }
    }
}

impl TaskSequence for PermutedTasks {
    fn len(&self) -> usize {
        self.tasks
    }

    fn task(&self, t: usize) -> Dataset {
        let mut d = self.base.clone();
        if t > 0 {
            let perm = task_permutation(d.input_dim(), t, self.seed);
            d.train.permute_features(&perm);
            d.test.permute_features(&perm);
        }
        d.name = format!("{}:task{t}", self.base.name);
        d
    }
}

/// EWC for a run: the penalty and the estimator whose per-sample gradients give each task's
/// Fisher (a separate instance from the training estimator, so that estimating the Fisher
/// leaves training's random streams alone).
pub struct EwcSetup {
    /// The penalty (usually fresh, with no task consolidated).
    pub ewc: Ewc,
    /// Per-sample gradients for the Fisher.
    pub estimator: Box<dyn GradientEstimator>,
}

/// Options of a continual-learning run.
#[derive(Debug, Clone, PartialEq)]
pub struct ContinualConfig {
    /// Epochs per task, batch size and the seed of batch order. Task `t`'s epoch `e`
    /// (1-based) uses batch-order epoch `t * epochs + e`, so tasks see fresh orders.
    pub train: TrainConfig,
    /// Batch size of evaluation.
    pub eval_batch: usize,
}

/// What happened on one task.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskReport {
    /// Task index (0-based).
    pub task: usize,
    /// Per-epoch metrics of the training on this task (test accuracy on this task).
    pub epochs: Vec<EpochMetrics>,
    /// Accuracy on each task seen so far after this task.
    pub accuracies: Vec<f64>,
    /// Seconds spent estimating this task's Fisher (EWC runs).
    pub fisher_seconds: Option<f64>,
    /// The EWC penalty (with its lambda) at the end of this task's training, before this
    /// task is consolidated (EWC runs).
    pub penalty: Option<f64>,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct ContinualReport {
    /// Accuracy after each task on each task seen so far.
    pub matrix: AccuracyMatrix,
    /// Per-task details.
    pub tasks: Vec<TaskReport>,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

/// Receives progress of a continual-learning run (and, through [`TrainObserver`], of each
/// epoch).
pub trait ContinualObserver: TrainObserver {
    /// Task `task` of `tasks` starts.
    fn task_start(&mut self, _task: usize, _tasks: usize) {}
    /// The Fisher of task `task` is being estimated on `samples` samples.
    fn fisher_start(&mut self, _task: usize, _samples: usize) {}
    /// Task `task` finished.
    fn task_end(&mut self, _report: &TaskReport) {}
}

impl ContinualObserver for crate::train::Silent {}

/// Trains `trainer` on every task of `tasks` in turn and records the accuracy matrix. With
/// `ewc`, each finished task (except the last, which nothing follows) is consolidated on the
/// first `fisher_samples` samples of a seeded shuffle of its training split, and the
/// trainer's penalty is replaced by the updated EWC penalty.
pub fn run(
    trainer: &mut Trainer,
    tasks: &dyn TaskSequence,
    config: &ContinualConfig,
    mut ewc: Option<EwcSetup>,
    observer: &mut dyn ContinualObserver,
) -> Result<ContinualReport, ContinualError> {
    if tasks.is_empty() {
        return Err(ContinualError::InvalidOption(
            "the task sequence is empty".into(),
        ));
    }
    if config.eval_batch == 0 {
        return Err(ContinualError::InvalidOption(
            "the evaluation batch size must be at least 1".into(),
        ));
    }
    let start = Instant::now();
    let epochs = config.train.epochs;
    let mut tests = Vec::with_capacity(tasks.len());
    let mut matrix = AccuracyMatrix::new();
    let mut reports = Vec::with_capacity(tasks.len());
    for t in 0..tasks.len() {
        observer.task_start(t, tasks.len());
        let data = tasks.task(t);
        let mut metrics = Vec::with_capacity(epochs);
        for e in 1..=epochs {
            metrics.push(trainer.run_epoch(&data, &config.train, t * epochs + e, observer)?);
        }
        tests.push(data.test.clone());
        let accuracies = tests
            .iter()
            .map(|split| trainer.evaluate(split, config.eval_batch))
            .collect::<Result<Vec<_>, _>>()?;
        matrix.push(accuracies.clone());
        let mut report = TaskReport {
            task: t,
            epochs: metrics,
            accuracies,
            fisher_seconds: None,
            penalty: trainer.penalty().map(|p| p.value(trainer.model().params())),
        };
        if let Some(setup) = ewc.as_mut()
            && t + 1 < tasks.len()
        {
            let samples = setup.ewc.config().fisher_samples.min(data.train.len());
            observer.fisher_start(t, samples);
            let fisher_start = Instant::now();
            let mut order: Vec<usize> = (0..data.train.len()).collect();
            let seed = crate::data::dataset::mix(config.train.seed ^ 0xF15E, t as u64);
            order.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(seed));
            let (model, device) = (trainer.model(), trainer.device());
            let fisher = diagonal_fisher(
                setup.estimator.as_mut(),
                model,
                &data.train,
                &order[..samples],
                device,
            )
            .map_err(|source| ContinualError::Fisher { task: t, source })?;
            setup.ewc.consolidate(&fisher, model.params())?;
            trainer.set_penalty(Some(Box::new(setup.ewc.clone())));
            report.fisher_seconds = Some(fisher_start.elapsed().as_secs_f64());
        }
        observer.task_end(&report);
        reports.push(report);
    }
    Ok(ContinualReport {
        matrix,
        tasks: reports,
        seconds: start.elapsed().as_secs_f64(),
    })
}
