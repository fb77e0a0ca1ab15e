//! Per-sample shapes of the values flowing through a network.
//!
//! Every value is stored as a `[batch, features]` matrix; its [`Shape`] says how a layer
//! reads the features (flat vector, `C x H x W` image, or `T x D` token sequence).

use std::fmt;

/// The per-sample shape of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A flat vector of features.
    Flat(usize),
    /// An image, channels first.
    Image {
        /// Channels.
        c: usize,
        /// Height.
        h: usize,
        /// Width.
        w: usize,
    },
    /// A sequence of `t` tokens of width `d`.
    Seq {
        /// Tokens.
        t: usize,
        /// Features per token.
        d: usize,
    },
}

impl Shape {
    /// Number of scalars per sample.
    pub fn numel(&self) -> usize {
        match *self {
            Self::Flat(n) => n,
            Self::Image { c, h, w } => c * h * w,
            Self::Seq { t, d } => t * d,
        }
    }

    /// The shape of a data set's samples (`[C, H, W]`): an image unless it is `1 x 1 x N`.
    pub fn from_chw(chw: [usize; 3]) -> Self {
        match chw {
            [1, 1, n] => Self::Flat(n),
            [c, h, w] => Self::Image { c, h, w },
        }
    }
}

impl Shape {
    /// The shape as `[C, H, W]`, the inverse of [`Shape::from_chw`] (a flat vector is
    /// `1 x 1 x N`, a sequence `1 x T x D`).
    pub fn chw(&self) -> [usize; 3] {
        match *self {
            Self::Flat(n) => [1, 1, n],
            Self::Image { c, h, w } => [c, h, w],
            Self::Seq { t, d } => [1, t, d],
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Flat(n) => write!(f, "{n}"),
            Self::Image { c, h, w } => write!(f, "{c}x{h}x{w}"),
            Self::Seq { t, d } => write!(f, "{t} tokens x {d}"),
        }
    }
}
