//! Progress bars (indicatif, on stderr; hidden when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};
use mep::data::download::DownloadProgress;
use mep::train::{EpochMetrics, TrainObserver};

/// Download progress as a byte bar.
#[derive(Default)]
pub struct DownloadBar {
    bar: Option<ProgressBar>,
}

impl DownloadProgress for DownloadBar {
    fn start(&mut self, url: &str, total: Option<u64>) {
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let name = url.rsplit('/').next().unwrap_or(url).to_string();
        bar.set_message(name);
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

/// Training progress: one bar per epoch with running loss, accuracy and throughput, and a
/// summary line per epoch.
pub struct EpochBar {
    bar: Option<ProgressBar>,
    loss_sum: f64,
    correct: usize,
    seen: usize,
    epochs: usize,
    quiet: bool,
}

impl EpochBar {
    /// A bar for a run of `epochs` epochs; `quiet` suppresses the summary lines.
    pub fn new(epochs: usize, quiet: bool) -> Self {
        Self {
            bar: None,
            loss_sum: 0.0,
            correct: 0,
            seen: 0,
            epochs,
            quiet,
        }
    }
}

impl TrainObserver for EpochBar {
    fn epoch_start(&mut self, epoch: usize, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", self.epochs));
        self.bar = Some(bar);
        self.loss_sum = 0.0;
        self.correct = 0;
        self.seen = 0;
    }

    fn batch_end(&mut self, loss: f32, correct: usize, samples: usize) {
        self.loss_sum += loss as f64 * samples as f64;
        self.correct += correct;
        self.seen += samples;
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "loss {:.4} acc {:.2}%",
                self.loss_sum / self.seen as f64,
                100.0 * self.correct as f64 / self.seen as f64
            ));
            bar.inc(1);
        }
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            errln!(
                "epoch {:>3}/{}  loss {:.4}  train {:6.2}%  test {:6.2}%  {:.2}s  {:.0} samples/s",
                m.epoch,
                self.epochs,
                m.train_loss,
                100.0 * m.train_accuracy,
                100.0 * m.test_accuracy,
                m.seconds,
                m.samples_per_second
            );
        }
    }
}

/// A bar over `total` items of work (`unit`), with the current item as its message.
pub fn count_bar(total: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "[{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}
