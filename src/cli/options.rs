//! The CLI's side of run setup: the library's options and recipe, with download progress
//! bars and error context.

use anyhow::{Context, Result};
use mep::data::{DataLocator, Dataset, LoadOptions};
use mep::estimate::GradientEstimator;
use mep::model::Network;
use mep::optim::Optimizer;

pub use mep::experiment::{EstimatorArg, TrainOptions, build_network};

use super::progress::DownloadBar;

/// [`mep::experiment::load_or_fetch`] with a download progress bar.
pub fn load_or_fetch(
    name: &str,
    locator: &DataLocator,
    options: &LoadOptions,
    seed: u64,
    fetch: bool,
) -> Result<Dataset> {
    let mut bar = DownloadBar::default();
    mep::experiment::load_or_fetch(name, locator, options, seed, fetch, &mut bar)
        .with_context(|| format!("loading data set `{name}`"))
}

/// The estimator and optimizer of a run, and a label for people.
pub struct Setup {
    /// The gradient estimator.
    pub estimator: Box<dyn GradientEstimator>,
    /// The optimizer.
    pub optimizer: Box<dyn Optimizer>,
    /// Human-readable description.
    pub label: String,
    /// The resolved recipe.
    pub recipe: mep::experiment::Recipe,
}

/// The recipe of `opts` built for `model` (`samples` training samples).
pub fn setup(opts: &TrainOptions, model: &Network, samples: usize, seed: u64) -> Result<Setup> {
    let recipe = opts.recipe(samples)?;
    let (estimator, optimizer) = recipe.build(model, samples, seed)?;
    Ok(Setup {
        estimator,
        optimizer,
        label: recipe.label(),
        recipe,
    })
}

/// Parses `--nudging`.
pub fn parse_nudging(s: &str) -> Result<mep::estimate::Nudging, String> {
    s.parse()
        .map_err(|e: mep::estimate::EstimateError| e.to_string())
}
