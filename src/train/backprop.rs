//! The backprop baseline: forward pass, cross-entropy, burn autodiff, first-order optimizer.

use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, TensorData};

use super::{EpochMetrics, TrainError, TrainObserver};
use crate::data::{Batcher, Dataset, Split, one_hot_into};
use crate::device::{Device, Tensor, autodiff};
use crate::model::{ModelError, Network};
use crate::optim::{Adam, Optimizer, Sgd};

/// First-order optimizers available to the backprop baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum (default lr 0.1, momentum 0.9, as the paper's SGD row).
    Sgd,
    /// Adam (default lr 0.001).
    Adam,
}

impl OptimizerKind {
    /// The paper's learning rate for this optimizer.
    pub fn default_lr(self) -> f64 {
        match self {
            Self::Sgd => 0.1,
            Self::Adam => 1e-3,
        }
    }

    /// Builds the optimizer.
    pub fn build(
        self,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<Box<dyn Optimizer>, TrainError> {
        Ok(match self {
            Self::Sgd => Box::new(Sgd::new(lr, momentum, false, weight_decay)?),
            Self::Adam => Box::new(Adam::new(lr, weight_decay)?),
        })
    }
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Number of passes over the training split.
    pub epochs: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
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

/// Trains a [`Network`] by backpropagation with a first-order optimizer.
pub struct BackpropTrainer {
    model: Network,
    optimizer: Box<dyn Optimizer>,
    device: Device,
    grad_device: Device,
    steps: u64,
    seed: u64,
}

impl BackpropTrainer {
    /// A trainer for `model` (whose parameters live on `device`).
    pub fn new(model: Network, optimizer: Box<dyn Optimizer>, device: Device) -> Self {
        let grad_device = autodiff(&device);
        Self {
            model,
            optimizer,
            device,
            grad_device,
            steps: 0,
            seed: 0,
        }
    }

    /// Seeds the dropout masks (step `k` draws from a generator seeded by `seed` and `k`).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The model as trained so far.
    pub fn model(&self) -> &Network {
        &self.model
    }

    /// One optimizer step on a batch; returns the batch's mean loss and correct predictions.
    pub fn train_step(
        &mut self,
        inputs: &[f32],
        labels: &[u32],
    ) -> Result<(f32, usize), TrainError> {
        let classes = self.model.output_shape().numel();
        let n = labels.len();
        // The tensors own their memory: one copy of the batch each, no further clones.
        let mut targets = Vec::with_capacity(n * classes);
        one_hot_into(labels, classes, &mut targets);
        let x = Tensor::<2>::from_data(
            TensorData::new(inputs.to_vec(), [n, inputs.len() / n]),
            &self.grad_device,
        );
        let y = Tensor::<2>::from_data(TensorData::new(targets, [n, classes]), &self.grad_device);
        let tracked: Vec<Tensor<2>> = self
            .model
            .params()
            .iter()
            .map(|p| Tensor::from_inner(p.clone()).require_grad())
            .collect();
        self.steps += 1;
        let dropout_seed = crate::data::dataset::mix(self.seed, self.steps);
        let (logits, moments) = self.model.forward_train(&tracked, x, Some(dropout_seed));
        let correct = count_correct(logits.clone().inner(), labels);
        let loss = cross_entropy(logits, y);
        let loss_value = loss.clone().into_scalar();
        let grads = loss.backward();
        let grads: Vec<Tensor<2>> = tracked
            .iter()
            .map(|p| {
                p.grad(&grads)
                    .unwrap_or_else(|| Tensor::zeros(p.shape(), &self.device))
            })
            .collect();
        let params = self.model.params().to_vec();
        let updated = self.optimizer.step(params, grads)?;
        self.model.set_params(updated)?;
        self.model.update_running_stats(&moments, n);
        Ok((loss_value, correct))
    }

    /// Trains for `config.epochs` epochs, evaluating on the test split after each.
    pub fn fit(
        &mut self,
        dataset: &Dataset,
        config: &TrainConfig,
        observer: &mut dyn TrainObserver,
    ) -> Result<Vec<EpochMetrics>, TrainError> {
        config.validate()?;
        check_fits(&self.model, dataset)?;
        let mut history = Vec::with_capacity(config.epochs);
        for epoch in 1..=config.epochs {
            let mut batches =
                Batcher::new(&dataset.train, config.batch_size, config.seed, epoch, true)?;
            observer.epoch_start(epoch, batches.num_batches());
            let start = Instant::now();
            let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
            let mut index = 0;
            while let Some(batch) = batches.next_batch() {
                index += 1;
                let (loss, right) = self.train_step(&batch.inputs, &batch.labels)?;
                if !loss.is_finite() {
                    return Err(TrainError::Diverged {
                        epoch,
                        batch: index,
                        loss,
                    });
                }
                loss_sum += loss as f64 * batch.len() as f64;
                correct += right;
                seen += batch.len();
                observer.batch_end(loss, right, batch.len());
            }
            let seconds = start.elapsed().as_secs_f64();
            let test_accuracy = evaluate(&self.model, &dataset.test, config.batch_size.max(256))?;
            let metrics = EpochMetrics {
                epoch,
                train_loss: loss_sum / seen as f64,
                train_accuracy: correct as f64 / seen as f64,
                test_accuracy,
                seconds,
                samples_per_second: seen as f64 / seconds.max(1e-9),
            };
            observer.epoch_end(&metrics);
            history.push(metrics);
        }
        Ok(history)
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

/// Mean cross-entropy of softmax(`logits`) against one-hot (or soft) `targets`.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let [n, _] = logits.dims();
    (targets * log_softmax(logits, 1))
        .sum()
        .mul_scalar(-1.0 / n as f32)
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

/// Accuracy of `model` on `split`, in [0, 1], evaluated in batches of `batch_size`.
pub fn evaluate(model: &Network, split: &Split, batch_size: usize) -> Result<f64, TrainError> {
    let device = model.params()[0].device();
    let mut batches = Batcher::new(split, batch_size, 0, 0, false)?;
    let mut correct = 0;
    while let Some(batch) = batches.next_batch() {
        let x = Tensor::<2>::from_data(
            TensorData::new(batch.inputs.clone(), [batch.len(), split.dim()]),
            &device,
        );
        correct += count_correct(model.forward(x), &batch.labels);
    }
    Ok(correct as f64 / split.len() as f64)
}
