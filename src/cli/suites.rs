//! `mep bench table1|table2|xor|speed|sota|deep|conv`: the library's suites with progress bars.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mep::data::DataLocator;
use mep::data::download::DownloadProgress;
use mep::device::Workload;
use mep::experiment::suites::{Suite, SuiteConfig, SuiteObserver};
use mep::train::{EpochMetrics, TrainObserver};

use super::Globals;
use super::progress::{DownloadBar, EpochBar};

#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Minute-scale smoke version of the suite.
    #[arg(long)]
    pub quick: bool,
    /// Seeds (each run is repeated per seed; the table shows mean +- std).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// Output directory (default results/NAME).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Do not download missing data sets.
    #[arg(long)]
    pub no_fetch: bool,
    /// Print results.json on stdout as well.
    #[arg(long)]
    pub json: bool,
}

/// A quiet epoch bar per run, a line as each run starts.
#[derive(Default)]
struct SuiteBars {
    bar: Option<EpochBar>,
    download: DownloadBar,
}

impl TrainObserver for SuiteBars {
    fn epoch_start(&mut self, epoch: usize, batches: usize) {
        if let Some(b) = &mut self.bar {
            b.epoch_start(epoch, batches);
        }
    }
    fn batch_end(&mut self, loss: f32, correct: usize, samples: usize) {
        if let Some(b) = &mut self.bar {
            b.batch_end(loss, correct, samples);
        }
    }
    fn epoch_end(&mut self, metrics: &EpochMetrics) {
        if let Some(b) = &mut self.bar {
            b.epoch_end(metrics);
        }
    }
}

impl SuiteObserver for SuiteBars {
    fn run_start(&mut self, index: usize, total: usize, description: &str, epochs: usize) {
        errln!("[{index}/{total}] {description}");
        self.bar = Some(EpochBar::new(epochs, true));
    }

    fn download(&mut self) -> &mut dyn DownloadProgress {
        &mut self.download
    }
}

pub fn run(suite: Suite, args: SuiteArgs, globals: &Globals) -> Result<()> {
    let name = suite.name();
    let dir = args
        .out
        .unwrap_or_else(|| PathBuf::from("results").join(&name));
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let config = SuiteConfig {
        quick: args.quick,
        seeds: args.seeds,
        seed: globals.seed,
        locator: &locator,
        fetch: !args.no_fetch,
        device: globals.device.resolve(Workload::Backprop)?,
        device_label: globals.device.to_string(),
    };
    let results = suite
        .run(&config, &mut SuiteBars::default())
        .with_context(|| format!("bench {name}"))?;
    let files = results.write(&dir)?;
    err!("{}", results.table);
    errln!(
        "results in {} (results.json, table.md, {} charts)",
        dir.display(),
        files.len()
    );
    if args.json {
        outln!("{}", serde_json::to_string(&results.json)?)?;
    }
    Ok(())
}
