//! Comparing two gradients parameter by parameter.

use crate::device::{Tensor, to_host};
use crate::model::Network;

/// How one parameter's estimated gradient compares with a reference.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GradientComparison {
    /// Parameter name.
    pub name: String,
    /// Cosine similarity of the two gradients (0 when either is zero).
    pub cosine: f64,
    /// `||estimate|| / ||reference||` (infinite when the reference is zero and the estimate
    /// is not, 1 when both are zero).
    pub norm_ratio: f64,
    /// `||estimate||`.
    pub norm: f64,
    /// `||reference||`.
    pub reference_norm: f64,
}

fn host(t: &Tensor<2>) -> Vec<f64> {
    to_host(t).into_iter().map(f64::from).collect()
}

/// Cosine and norm ratio of `estimate` against `reference` for every parameter of `net`
/// (computed in f64 on the host).
pub fn compare(
    net: &Network,
    estimate: &[Tensor<2>],
    reference: &[Tensor<2>],
) -> Vec<GradientComparison> {
    net.param_info()
        .iter()
        .zip(estimate.iter().zip(reference))
        .map(|(info, (e, r))| {
            let (e, r) = (host(e), host(r));
            let dot: f64 = e.iter().zip(&r).map(|(a, b)| a * b).sum();
            let ne = e.iter().map(|a| a * a).sum::<f64>().sqrt();
            let nr = r.iter().map(|a| a * a).sum::<f64>().sqrt();
            let cosine = if ne > 0.0 && nr > 0.0 {
                dot / (ne * nr)
            } else {
                0.0
            };
            let norm_ratio = match (ne > 0.0, nr > 0.0) {
                (_, true) => ne / nr,
                (true, false) => f64::INFINITY,
                (false, false) => 1.0,
            };
            GradientComparison {
                name: info.name.clone(),
                cosine,
                norm_ratio,
                norm: ne,
                reference_norm: nr,
            }
        })
        .collect()
}
