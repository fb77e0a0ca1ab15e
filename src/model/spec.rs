//! The compact model grammar.
//!
//! `N0-N1-...-Nk` is a fully connected network with `N0` inputs, hidden widths `N1..N(k-1)`
//! (ReLU after each) and `Nk` outputs, e.g. `784-256-128-10`. Named shortcuts:
//! `mlp-small` = `784-256-10`, `mlp` = `784-256-128-10`.

use std::fmt;
use std::str::FromStr;

use super::ModelError;

/// Named models and what they expand to.
pub const NAMED_MODELS: &[(&str, &str)] = &[("mlp-small", "784-256-10"), ("mlp", "784-256-128-10")];

/// A parsed model description: the widths of a fully connected network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    sizes: Vec<usize>,
}

impl ModelSpec {
    /// A spec from explicit layer widths (input first, output last).
    pub fn from_sizes(sizes: Vec<usize>) -> Result<Self, ModelError> {
        let spec = sizes
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("-");
        if sizes.len() < 2 {
            return Err(ModelError::InvalidSpec {
                spec,
                reason: "needs at least an input and an output width".into(),
            });
        }
        if sizes.contains(&0) {
            return Err(ModelError::InvalidSpec {
                spec,
                reason: "widths must be positive".into(),
            });
        }
        Ok(Self { sizes })
    }

    /// Layer widths, input first.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Number of inputs.
    pub fn input_dim(&self) -> usize {
        self.sizes[0]
    }

    /// Number of outputs.
    pub fn output_dim(&self) -> usize {
        *self.sizes.last().expect("a spec has at least two widths")
    }
}

impl FromStr for ModelSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let expanded = NAMED_MODELS
            .iter()
            .find(|(name, _)| *name == text)
            .map_or(text, |(_, sizes)| *sizes);
        let sizes = expanded
            .split('-')
            .map(|part| {
                part.trim().parse::<usize>().map_err(|_| ModelError::InvalidSpec {
                    spec: s.to_string(),
                    reason: format!(
                        "`{part}` is not a layer width (expected widths joined by '-', like 784-256-10, or one of: {})",
                        NAMED_MODELS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    ),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_sizes(sizes).map_err(|e| match e {
            ModelError::InvalidSpec { reason, .. } => ModelError::InvalidSpec {
                spec: s.to_string(),
                reason,
            },
            other => other,
        })
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.sizes.iter().map(|s| s.to_string()).collect();
        write!(f, "{}", parts.join("-"))
    }
}
