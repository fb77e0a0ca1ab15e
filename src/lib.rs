//! # mep
//!
//! Equilibrium Propagation (EP) and geometry-aware optimizers on burn.
//!
//! The crate is layered as the data flows: [`data`] (IDX files, named data sets, batching)
//! → [`model`] (layers, forward passes and vector-Jacobian products) → [`ep`] (the energy,
//! settling, EqProp) and [`estimate`] (backprop, EP, local EP, EqProp gradient estimators)
//! → [`optim`] (update rules) → [`train`] (loop and metrics; [`continual`]: task sequences
//! and EWC) → [`bench`](mod@bench) → [`experiment`] (options, presets and recipes, run
//! setup, suites: everything a front-end needs). [`loss`] is the task loss they share;
//! [`device`] holds the tensor stack. The `mep` binary is one front-end; see
//! ARCHITECTURE.md for the module graph.

#![warn(missing_docs)]

pub mod bench;
pub mod continual;
pub mod data;
pub mod device;
pub mod ep;
pub mod estimate;
pub mod experiment;
pub mod loss;
pub mod model;
pub mod optim;
pub mod simd;
pub mod train;
