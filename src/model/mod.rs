//! Models: explicitly declared layer chains, their parameters, forward passes and
//! vector-Jacobian products.
//!
//! A [`Network`] is built either from the compact grammar ([`ModelSpec`], e.g.
//! `784-256-128-10` or `conv32k5-pool2-conv64k5-pool2-fc10`) or layer by layer with a
//! [`NetworkBuilder`]. Sizes are inferred and checked at build time. The outputs of
//! linear, convolution and attention layers (pre-activation) are the EP states.

mod activation;
mod cost;
mod factors;
pub mod kernels;
mod layer;
mod layers;
mod network;
mod shape;
mod spec;

pub use activation::Activation;
pub use cost::Gemm;
pub use factors::{Factored, GradFactors};
pub(crate) use factors::{column_means, weight_rows};
pub(crate) use layer::{Aux, NormStats};
pub use layer::{Layer, LayerOp};
pub use network::{
    BatchMoments, LayerKind, Network, NetworkBuilder, ParamInfo, ParamKind, RunningStats, Skip,
};
pub use shape::Shape;
pub use spec::{ModelSpec, NAMED_MODELS};

/// Errors in building a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The spec string is not in the grammar, or the layers do not fit together.
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
