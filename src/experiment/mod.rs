//! Experiments: everything a run needs above the training loop, so that every front-end
//! (the `mep` binary, a Python package, an MPI launcher) maps its inputs onto the same
//! calls.
//!
//! * [`TrainOptions`] — every setting of a training run, all optional (serde; the CLI's
//!   flags are derived from the same struct), layered flags > config file > preset >
//!   defaults with [`TrainOptions::or`].
//! * [`Preset`] names the paper's and our configurations; [`Recipe`] is a resolved
//!   estimator plus composite optimizer ([`TrainOptions::recipe`]: a preset or the
//!   estimator/optimizer flags, then every override), built for a network with
//!   [`Recipe::build`].
//! * [`load_or_fetch`] and [`build_network`] turn a data-set name and a model spec into
//!   data and a checked network; [`Prepared`] does the whole setup of one run.
//! * [`TrainRun`] is a whole run as a front-end drives it ([`RunRequest`]: options, seed,
//!   run directory, resume), on a named data set or on arrays ([`DataSource`]), epoch by
//!   epoch.
//! * [`RunMeta`] is what a checkpoint records about its run; [`RunMeta::resume`] checks a
//!   resumed run against it; [`write_atomic`] writes result files.
//!
//! ```
//! use mep::experiment::{Preset, TrainOptions};
//!
//! // `--preset smep --lr 0.02 --settle-steps 10`, as a library call.
//! let opts = TrainOptions {
//!     preset: Some("smep".into()),
//!     lr: Some(0.02),
//!     settle_steps: Some(10),
//!     ..TrainOptions::default()
//! };
//! let recipe = opts.recipe(60_000).unwrap();
//! assert_eq!(recipe.preset, Some(Preset::Smep));
//! assert_eq!(recipe.optimizer.lr, 0.02);
//! assert_eq!(recipe.estimator.ep_config().unwrap().settle.steps, 10);
//! ```

pub mod check;
pub mod continual;
mod error;
mod options;
mod preset;
mod recipe;
mod run;
mod run_dir;
mod session;
pub mod suites;

pub use error::ExperimentError;
pub use options::{
    DEFAULT_BATCH, DEFAULT_DATASET, DEFAULT_EPOCHS, DEFAULT_MODEL, DEFAULT_STANDARDIZE,
    EstimatorArg, OptimizerArg, Standardize, TrainOptions,
};
pub use preset::{FAST_SETTLE_LR, Preset};
pub use recipe::{Built, EstimatorChoice, Recipe};
pub use run::{
    CHECKPOINT, Prepared, RunMeta, build_network, load_or_fetch, read_meta, write_atomic,
};
pub use run_dir::{RunDir, RunLock};
pub use session::{ARRAYS_DATASET, DEFAULT_SEED, DataSource, RunRequest, TrainRun};
