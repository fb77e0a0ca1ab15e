//! Equilibrium propagation's physics: the energy of a network, settling in state space, and
//! the classic Hopfield-energy EqProp of Scellier & Bengio (2017).
//!
//! The gradient estimators built on these live in [`crate::estimate`].

mod blocks;
mod conv;
mod convergence;
mod dense;
mod energy;
mod eqprop;
pub(crate) mod lean;
mod settle;

pub use convergence::{
    ADAPTIVE_GROWTH, ADAPTIVE_MAX_FACTOR, ADAPTIVE_SHRINK, BLOWUP_FACTOR, CURVATURE_ITERATIONS,
    CURVATURE_SAFETY, SettleConfig, SettleError, SettleStats, Settled,
};
pub(crate) use energy::DensePlan;
pub use energy::{BatchContext, EnergyModel, Evaluation};
pub use eqprop::{EqPropConfig, EqPropInit, EqPropModel, EqPropNetworkError};
pub use settle::{Settler, largest_curvature};
