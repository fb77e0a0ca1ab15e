//! EP training of an MLP on MNIST through the library API: the `smep_plus` recipe, the
//! same setup `mep train` does, with each epoch printed.
//!
//! ```sh
//! cargo run --release --example train_mlp            # full MNIST, 3 epochs
//! cargo run --release --example train_mlp -- 5000 1000 # 5000 train / 1000 test samples
//! ```
//!
//! MNIST is read from `$MEP_DATA_DIR` or the user cache, and fetched when missing.

use std::error::Error;

use mep::data::DataLocator;
use mep::data::download::NoProgress;
use mep::device::{DeviceChoice, Workload};
use mep::experiment::{Prepared, TrainOptions};
use mep::train::{EpochMetrics, TrainObserver};

/// Prints one line per epoch.
struct Print;

impl TrainObserver for Print {
    fn epoch_end(&mut self, m: &EpochMetrics) {
        println!(
            "epoch {}: loss {:.4}, train {:.2}%, test {:.2}%, {:.1} s",
            m.epoch,
            m.train_loss,
            100.0 * m.train_accuracy,
            100.0 * m.test_accuracy,
            m.seconds
        );
    }
}

/// Trains `784-256-10`, with data from `locator`, with the `smep_plus` recipe (EP, Muon, cosine schedule) for `epochs`
/// epochs on the first `train` / `test` MNIST samples (all when `None`); returns the final
/// test accuracy.
pub fn train(
    locator: &DataLocator,
    train: Option<usize>,
    test: Option<usize>,
    epochs: usize,
    observer: &mut dyn TrainObserver,
) -> Result<f64, Box<dyn Error>> {
    let options = TrainOptions {
        dataset: Some("mnist".into()),
        model: Some("784-256-10".into()),
        preset: Some("smep_plus".into()),
        epochs: Some(epochs),
        train_samples: train,
        test_samples: test,
        ..TrainOptions::default()
    };
    let device = DeviceChoice::default().resolve(Workload::Settle)?;
    let mut run = Prepared::new(options, 42, device, locator, true, &mut NoProgress)?;
    let history = run.trainer.fit(&run.dataset, &run.config, observer)?;
    Ok(history.last().map_or(0.0, |m| m.test_accuracy))
}

#[allow(dead_code)] // The tests call `train` directly.
fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let train_samples = args.next().transpose()?;
    let test_samples = args.next().transpose()?;
    let locator = DataLocator::from_env(None);
    let accuracy = train(&locator, train_samples, test_samples, 3, &mut Print)?;
    println!("final test accuracy {:.2}%", 100.0 * accuracy);
    Ok(())
}
