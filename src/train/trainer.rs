//! The training loop: any gradient estimator, any optimizer, per-epoch evaluation.

use std::rc::Rc;
use std::time::Instant;

use burn::tensor::{Int, TensorData};

use super::Monitor;
use super::parallel::{Collective, StepBuffers, StepShare, check_agreement, digest, share};
use super::{EpochMetrics, Penalty, TrainError, TrainObserver};
use crate::data::{Augment, Batcher, Dataset, Split};
use crate::device::{Device, Tensor, to_host};
use crate::ep::SettleStats;
use crate::estimate::{GradientEstimator, TensorBatch};
use crate::model::{ModelError, Network};
use crate::optim::Optimizer;

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Number of passes over the training split.
    pub epochs: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Augmentation of training batches (none by default).
    #[serde(default)]
    pub augment: Augment,
}

impl TrainConfig {
    fn validate(&self) -> Result<(), TrainError> {
        if self.epochs == 0 {
            return Err(TrainError::InvalidOption(
                "epochs must be at least 1".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(TrainError::InvalidOption(
                "batch size must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A batch's loss above this multiple of the run's first batch loss (at least 1) is
/// divergence: training stops with [`TrainError::Diverged`] instead of going on to report
/// chance accuracy with exit 0 (backprop at lr 1e6 reached losses of 1e26).
pub const DIVERGENCE_FACTOR: f32 = 100.0;

/// Trains a [`Network`] with any [`GradientEstimator`] and any [`Optimizer`].
pub struct Trainer {
    model: Network,
    estimator: Box<dyn GradientEstimator>,
    optimizer: Box<dyn Optimizer>,
    device: Device,
    monitor: Option<Monitor>,
    penalty: Option<Box<dyn Penalty>>,
    steps: usize,
    epoch: usize,
    first_loss: Option<f32>,
    collective: Option<Rc<dyn Collective>>,
    /// A data-parallel step's exchange buffers, reused.
    exchange: StepBuffers,
}

/// What one training step did.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// Mean loss of the prediction on the batch (before the update).
    pub loss: f32,
    /// Correct predictions on the batch (before the update).
    pub correct: usize,
    /// What each settle did (EP estimators).
    pub settle: Vec<SettleStats>,
}

impl Trainer {
    /// A trainer for `model` (whose parameters live on `device`).
    /// The optimizer first makes the initial parameters feasible ([`Optimizer::prepare`]).
    ///
    /// Where the estimator can ([`GradientEstimator::set_factored`]: EP's linear layers),
    /// a gradient is formed from the batch's per-sample factors in batch order, one and the
    /// same computation however many processes share the batch (see
    /// [`Trainer::set_collective`]).
    pub fn new(
        mut model: Network,
        mut estimator: Box<dyn GradientEstimator>,
        mut optimizer: Box<dyn Optimizer>,
        device: Device,
    ) -> Self {
        estimator.set_factored(true);
        let prepared = optimizer.prepare(model.params().to_vec());
        model
            .set_params(prepared)
            .expect("prepare keeps the parameter shapes");
        Self {
            model,
            estimator,
            optimizer,
            device,
            monitor: None,
            penalty: None,
            steps: 0,
            epoch: 0,
            first_loss: None,
            collective: None,
            exchange: StepBuffers::default(),
        }
    }

    /// Trains data-parallel over `collective`'s ranks (or, with `None` or one rank, alone):
    /// each step estimates this rank's share of the batch ([`super::parallel::share`]),
    /// and the shares' gradients, losses, settle statistics, factors and batch moments are
    /// combined in rank order before the (identical) optimizer step; evaluation splits
    /// the test split the same way. Every rank must run the same trainer on the same data.
    /// Factored gradients ([`Trainer::new`]) travel as their per-sample factors, and every
    /// rank multiplies out its share of each weight's rows over the whole batch.
    pub fn set_collective(&mut self, collective: Option<Rc<dyn Collective>>) {
        self.collective = collective.filter(|c| c.size() > 1);
        let split = self
            .collective
            .clone()
            .map(|c| Rc::new(super::parallel::SplitOver(c)) as Rc<dyn crate::optim::WorkSplit>);
        self.optimizer.set_work_split(split);
    }

    /// The collective of a data-parallel run (`None` when training alone).
    pub fn collective(&self) -> Option<&dyn Collective> {
        self.collective.as_deref()
    }

    /// Attaches a [`Monitor`] (see [`Trainer::take_monitor_records`]).
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.set_monitor(Some(monitor));
        self
    }

    /// Attaches (or with `None` removes) a [`Monitor`].
    pub fn set_monitor(&mut self, monitor: Option<Monitor>) {
        self.monitor = monitor;
    }

    /// Sets (or with `None` removes) the [`Penalty`] whose gradient is added to every
    /// estimated gradient from the next step on.
    pub fn set_penalty(&mut self, penalty: Option<Box<dyn Penalty>>) {
        self.penalty = penalty;
    }

    /// The penalty in force, if any.
    pub fn penalty(&self) -> Option<&dyn Penalty> {
        self.penalty.as_deref()
    }

    /// The monitor's records since the last call.
    pub fn take_monitor_records(&mut self) -> Vec<super::MonitorRecord> {
        self.monitor
            .as_mut()
            .map(Monitor::drain)
            .unwrap_or_default()
    }

    /// The model as trained so far.
    pub fn model(&self) -> &Network {
        &self.model
    }

    /// The model, to replace its parameters (for example loaded from another format).
    pub fn model_mut(&mut self) -> &mut Network {
        &mut self.model
    }

    /// The device its tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The gradient estimator.
    pub fn estimator(&self) -> &dyn GradientEstimator {
        self.estimator.as_ref()
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// Writes the model and the optimizer's state to a checkpoint file.
    /// `meta` is stored beside the estimator's counters.
    pub fn save_checkpoint(
        &self,
        path: &std::path::Path,
        meta: &serde_json::Value,
    ) -> Result<(), super::checkpoint::CheckpointError> {
        let wrapped = serde_json::json!({
            "meta": meta,
            "estimator": self.estimator.state(),
        });
        super::checkpoint::save(path, &self.model, self.optimizer.as_ref(), &wrapped)
    }

    /// Restores the model and the optimizer's state from a checkpoint file; returns its
    /// stored metadata.
    pub fn load_checkpoint(
        &mut self,
        path: &std::path::Path,
    ) -> Result<serde_json::Value, super::checkpoint::CheckpointError> {
        let mut wrapped =
            super::checkpoint::load(path, &mut self.model, Some(self.optimizer.as_mut()))?;
        let state: Vec<(String, f64)> =
            serde_json::from_value(wrapped["estimator"].take()).unwrap_or_default();
        self.estimator.load_state(&state);
        Ok(wrapped["meta"].take())
    }

    /// The name of the first parameter holding a NaN or an infinity, if any (one host
    /// read per parameter).
    pub fn non_finite_param(&self) -> Option<String> {
        self.model
            .params()
            .iter()
            .zip(self.model.param_info())
            // `0 x` is 0 for every finite x and NaN for a NaN or an infinity, so the sum is
            // finite exactly when every entry is (a sum of |x| overflows on large finite
            // entries).
            .find(|(p, _)| {
                !to_host(&(*p).clone().mul_scalar(0.0).sum().reshape([1, 1]))[0].is_finite()
            })
            .map(|(_, info)| info.name.clone())
    }

    /// One optimizer step on a host batch (with a collective: this rank's share of it, the
    /// shares combined; see [`Trainer::set_collective`]).
    pub fn train_step(
        &mut self,
        inputs: &[f32],
        labels: &[u32],
        indices: Option<&[usize]>,
    ) -> Result<StepOutcome, TrainError> {
        let classes = self.model.output_shape().numel();
        let dim = inputs.len() / labels.len().max(1);
        let rows = match &self.collective {
            Some(c) => share(labels.len(), c.rank(), c.size()),
            None => 0..labels.len(),
        };
        if rows.is_empty() {
            return Err(TrainError::InvalidOption(format!(
                "a batch of {} samples leaves rank {} without a sample: every batch needs at least one sample per rank",
                labels.len(),
                self.collective.as_ref().map_or(0, |c| c.rank())
            )));
        }
        let (inputs, labels) = (
            &inputs[rows.start * dim..rows.end * dim],
            &labels[rows.clone()],
        );
        let mut batch = TensorBatch::new(inputs, labels, classes, &self.device);
        batch.indices = indices.map(|i| i[rows.clone()].to_vec());
        let mut estimate = self.estimator.estimate(&self.model, &batch)?;
        self.steps += 1;
        if let Some(m) = self.monitor.as_mut()
            && m.due(self.steps)
        {
            // The monitor looks at this share's own gradients.
            let mut own = estimate.clone();
            own.complete(labels.len(), |_| true);
            m.record(self.steps, self.epoch, &self.model, &batch, &own)?;
        }
        let mut correct = count_correct(estimate.output.clone(), labels);
        let mut samples = labels.len();
        let local = match &self.collective {
            Some(_) => self.optimizer.reduces_across_ranks(),
            None => Vec::new(),
        };
        // A gradient the optimizer combines across the ranks itself is this share's own.
        estimate.complete(samples, |k| local.get(k).copied().unwrap_or(false));
        if let Some(c) = &self.collective {
            let total = StepShare {
                samples,
                loss: estimate.loss,
                correct,
                settle: &estimate.settle,
                grads: std::mem::take(&mut estimate.grads),
                local: &local,
                factors: &estimate.factors,
                factored: &estimate.factored,
                moments: &estimate.moments,
            }
            .combine(c.as_ref(), &self.device, &mut self.exchange)?;
            (estimate.loss, correct, samples) = (total.loss, total.correct, total.samples);
            estimate.settle = total.settle;
            estimate.grads = total.grads;
            estimate.factors = total.factors;
            estimate.factored = Vec::new();
            estimate.moments = total.moments;
        }
        // Alone: the factored gradients are formed here.
        estimate.complete(samples, |_| true);
        let mut grads = estimate.grads;
        let penalty = self.penalty.as_deref();
        if let Some(p) = penalty.filter(|p| !p.decoupled()) {
            let rank = self.collective.as_ref().map_or(0, |c| c.rank());
            for (k, (g, extra)) in grads
                .iter_mut()
                .zip(p.gradient(self.model.params()))
                .enumerate()
            {
                // A gradient kept as rank shares takes the penalty once, on rank 0.
                let share = local.get(k).copied().unwrap_or(false);
                if let Some(extra) = extra.filter(|_| !share || rank == 0) {
                    *g = g.clone() + extra;
                }
            }
        }
        let lr = self.optimizer.learning_rate();
        // The model lends its own parameters, which nothing else holds now: each is
        // updated in its own buffer. A failed step leaves them as they were.
        self.optimizer
            .step_in_place(self.model.params_mut(), grads, &estimate.factors)?;
        if let Some(p) = penalty.filter(|p| p.decoupled()) {
            let updated = p.proximal(self.model.params().to_vec(), lr);
            self.model.set_params(updated)?;
        }
        self.model.update_running_stats(&estimate.moments, samples);
        Ok(StepOutcome {
            loss: estimate.loss,
            correct,
            settle: estimate.settle,
        })
    }

    /// Trains for `config.epochs` epochs, evaluating on the test split after each.
    pub fn fit(
        &mut self,
        dataset: &Dataset,
        config: &TrainConfig,
        observer: &mut dyn TrainObserver,
    ) -> Result<Vec<EpochMetrics>, TrainError> {
        (1..=config.epochs)
            .map(|epoch| self.run_epoch(dataset, config, epoch, observer))
            .collect()
    }

    /// Trains one epoch (`epoch` is 1-based: it seeds the batch order) and evaluates on the
    /// test split. Epochs can be run one by one, with checkpoints in between, and give the
    /// same results as [`Trainer::fit`].
    pub fn run_epoch(
        &mut self,
        dataset: &Dataset,
        config: &TrainConfig,
        epoch: usize,
        observer: &mut dyn TrainObserver,
    ) -> Result<EpochMetrics, TrainError> {
        config.validate()?;
        check_fits(&self.model, dataset)?;
        if let Some(c) = &self.collective {
            let (n, b, ranks) = (dataset.train.len(), config.batch_size, c.size());
            let last = if n % b == 0 { b.min(n) } else { n % b };
            if b.min(n) < ranks || last < ranks {
                return Err(TrainError::InvalidOption(format!(
                    "{ranks} ranks need at least one sample each in every batch: batch {b} over {n} samples leaves a batch of {}",
                    b.min(n).min(last)
                )));
            }
            if self.monitor.is_some() {
                return Err(TrainError::InvalidOption(
                    "the monitor records one process's batches: run it without mpirun".into(),
                ));
            }
        }
        self.epoch = epoch;
        config.augment.check(dataset.input_shape)?;
        let mut batches =
            Batcher::new(&dataset.train, config.batch_size, config.seed, epoch, true)?;
        let mut scratch = Vec::new();
        observer.epoch_start(epoch, batches.num_batches());
        // Every step alternates short parallel phases with serial ones. Not with ranks: the
        // ranks of one machine share its cores, which spinning workers would take from them.
        let awake = self
            .collective
            .is_none()
            .then(crate::device::keep_workers_awake)
            .flatten();
        let start = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut settle = SettleSummary::default();
        let mut index = 0;
        while let Some(batch) = batches.next_batch_mut() {
            index += 1;
            config.augment.apply(
                &mut batch.inputs,
                &batch.indices,
                dataset.input_shape,
                config.seed,
                epoch,
                &mut scratch,
            );
            let outcome = self.train_step(&batch.inputs, &batch.labels, Some(&batch.indices))?;
            let reference = *self.first_loss.get_or_insert(outcome.loss);
            if !outcome.loss.is_finite() || outcome.loss > DIVERGENCE_FACTOR * reference.max(1.0) {
                return Err(TrainError::Diverged {
                    epoch,
                    batch: index,
                    loss: outcome.loss,
                });
            }
            settle.add(&outcome.settle);
            loss_sum += outcome.loss as f64 * batch.len() as f64;
            correct += outcome.correct;
            seen += batch.len();
            observer.batch_end(outcome.loss, outcome.correct, batch.len());
            if observer.should_stop() {
                return Err(TrainError::Interrupted {
                    epoch,
                    batch: index,
                });
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        drop(awake);
        // A step can leave a parameter infinite while the loss still reads finite; such an
        // epoch must not be checkpointed.
        if let Some(param) = self.non_finite_param() {
            return Err(TrainError::NonFiniteParameter { epoch, param });
        }
        // Every rank took the same steps; a difference here (a kernel that is not
        // deterministic, a rank fed other data) would silently train several models.
        if let Some(c) = &self.collective {
            // Optimizer state kept as rank shares is summed, so that a checkpoint holds
            // the whole run's.
            self.optimizer.consolidate()?;
            let mut bytes = Vec::new();
            for p in self.model.params() {
                bytes.extend(to_host(p).iter().flat_map(|v| v.to_le_bytes()));
            }
            check_agreement(c.as_ref(), &[digest(&bytes)], "parameters after the epoch")?;
        }
        let test_accuracy = self.evaluate(&dataset.test, config.batch_size.max(256))?;
        let metrics = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            test_accuracy,
            seconds,
            samples_per_second: seen as f64 / seconds.max(1e-9),
            settle_steps_mean: settle.mean_steps(),
            settle_residual_mean: settle.mean_residual(),
            settle_unconverged: settle.phases.then_some(settle.unconverged),
        };
        observer.epoch_end(&metrics);
        Ok(metrics)
    }

    /// Accuracy of the estimator's prediction on `split`, in [0, 1] (with a collective,
    /// each rank predicts its share of the split and the counts are summed).
    pub fn evaluate(&self, split: &Split, batch_size: usize) -> Result<f64, TrainError> {
        let Some(c) = &self.collective else {
            return Ok(self.count_split(split, batch_size)? as f64 / split.len() as f64);
        };
        let rows = share(split.len(), c.rank(), c.size());
        let dim = split.dim();
        let correct = if rows.is_empty() {
            0
        } else {
            let part = Split::new(
                split.inputs()[rows.start * dim..rows.end * dim].to_vec(),
                split.labels()[rows].to_vec(),
                dim,
            )?;
            self.count_split(&part, batch_size)?
        };
        let all = c.all_gather_u64(&[correct as u64])?;
        let total: u64 = all.iter().flatten().sum();
        Ok(total as f64 / split.len() as f64)
    }

    /// Correct predictions on `split`.
    fn count_split(&self, split: &Split, batch_size: usize) -> Result<usize, TrainError> {
        let mut batches = Batcher::new(split, batch_size, 0, 0, false)?;
        let mut correct = 0;
        while let Some(batch) = batches.next_batch() {
            let x = Tensor::<2>::from_data(
                TensorData::new(batch.inputs.clone(), [batch.len(), split.dim()]),
                &self.device,
            );
            correct += count_correct(self.estimator.predict(&self.model, x), &batch.labels);
        }
        Ok(correct)
    }
}

/// Settle statistics summed over an epoch.
#[derive(Debug, Default)]
struct SettleSummary {
    phases: bool,
    count: usize,
    steps: f64,
    residual: f64,
    unconverged: usize,
}

impl SettleSummary {
    fn add(&mut self, stats: &[SettleStats]) {
        for s in stats {
            self.phases = true;
            self.count += 1;
            // Per sample: with per-sample stopping, samples stop at different steps.
            self.steps += f64::from(s.sample_steps);
            self.residual += s.residual as f64;
            self.unconverged += usize::from(!s.converged);
        }
    }

    fn mean_steps(&self) -> Option<f64> {
        (self.count > 0).then(|| self.steps / self.count as f64)
    }

    fn mean_residual(&self) -> Option<f64> {
        (self.count > 0).then(|| self.residual / self.count as f64)
    }
}

/// Checks that the model's input and output widths match the data set.
pub(crate) fn check_fits(model: &Network, dataset: &Dataset) -> Result<(), ModelError> {
    let (inputs, outputs) = (model.input_shape().numel(), model.output_shape().numel());
    let mismatch = |reason: String| ModelError::Mismatch {
        model: format!("{} -> {}", model.input_shape(), model.output_shape()),
        dataset: dataset.name.clone(),
        reason,
    };
    if inputs != dataset.input_dim() {
        return Err(mismatch(format!(
            "the model takes {inputs} inputs, the data has {}",
            dataset.input_dim()
        )));
    }
    if outputs != dataset.classes {
        return Err(mismatch(format!(
            "the model has {outputs} outputs, the data has {} classes",
            dataset.classes
        )));
    }
    Ok(())
}

fn count_correct(logits: Tensor<2>, labels: &[u32]) -> usize {
    let predicted: burn::tensor::Tensor<crate::device::Backend, 2, Int> = logits.argmax(1);
    let predicted = predicted.into_data().convert::<i64>();
    predicted
        .as_slice::<i64>()
        .expect("converted to i64")
        .iter()
        .zip(labels)
        .filter(|&(&p, &l)| p == l as i64)
        .count()
}
