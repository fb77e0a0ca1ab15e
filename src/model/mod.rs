//! Models: the layer chain, its parameters and its forward pass.
//!
//! This module currently holds the fully connected ReLU network ([`Mlp`]) used by the
//! backprop baseline and its spec grammar ([`ModelSpec`]); the EP energy models build on it.

mod mlp;
mod spec;

pub use mlp::Mlp;
pub use spec::ModelSpec;

/// Errors in building a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The spec string is not in the grammar.
    #[error("invalid model spec `{spec}`: {reason}")]
    InvalidSpec {
        /// The spec given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The model does not fit the data (input width or number of classes).
    #[error("model {model} does not fit data set {dataset}: {reason}")]
    Mismatch {
        /// The model spec.
        model: String,
        /// The data set.
        dataset: String,
        /// What differs.
        reason: String,
    },
}
