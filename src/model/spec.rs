//! The compact model grammar.
//!
//! A spec is tokens joined by `-`:
//!
//! | token | layer |
//! |---|---|
//! | `N` or `fcN` | linear layer with `N` outputs (a first bare `N` is the input width) |
//! | `CxHxW` (first token only) | image input shape |
//! | `convCkK[sS][pP]` | convolution: `C` channels, `K x K` kernel, stride `S` (1), padding `P` (0) |
//! | `poolK`, `maxpoolK`, `avgpoolK` | `K x K` pooling with stride `K` |
//! | `relu`, `lrelu`, `sigmoid`, `tanh`, `hsig`, `crelu`, `gelu`, `silu` | activation |
//! | `id` | no activation here (suppresses the implicit ReLU) |
//! | `ln`, `bn` | layer / batch normalisation |
//! | `dropP` | dropout with probability `P`, e.g. `drop0.2` |
//! | `flatten` | image or sequence to a flat vector |
//! | `tokensT` | flat vector to `T` tokens |
//! | `attnH` | self-attention with `H` heads |
//! | `res[...]` | residual block of the tokens inside the brackets |
//!
//! Two implicit rules keep common specs short: a ReLU is inserted before every linear,
//! conv, attention or pooling layer (and at the start of a residual block) that follows a
//! linear, conv or attention layer with no activation or `id` in between; and a linear
//! layer after an image or sequence is preceded by a `flatten`. Without an input token the
//! input shape is the data set's. Named models: see [`NAMED_MODELS`].
//!
//! `784-256-128-10` is `784 -> fc256 -> relu -> fc128 -> relu -> fc10`;
//! `conv32k5-pool2-conv64k5-pool2-fc10` is `conv -> relu -> maxpool -> conv -> relu ->
//! maxpool -> flatten -> fc10`.

use std::fmt;
use std::str::FromStr;

use super::network::{LayerKind, NetworkBuilder};
use super::{Activation, ModelError, Shape};

/// Named models and what they expand to.
pub const NAMED_MODELS: &[(&str, &str)] = &[
    ("mlp-small", "784-256-10"),
    ("mlp", "784-256-128-10"),
    ("cnn", "conv32k5-pool2-conv64k5-pool2-fc10"),
    ("cnn-small", "conv8k5-pool2-conv16k5-pool2-fc10"),
    // The EP literature's VGG5 (Laborieux et al. 2021, Scellier et al. 2023, Kerjan et al.
    // 2026): four 3x3 convolutions with padding 1, each followed by 2x2 max pooling, then
    // the classifier.
    (
        "vgg5",
        "conv128k3p1-pool2-conv256k3p1-pool2-conv512k3p1-pool2-conv512k3p1-pool2-fc10",
    ),
    // VGG5's shape at an eighth of its channels, for CPUs.
    (
        "vgg5-small",
        "conv16k3p1-pool2-conv32k3p1-pool2-conv64k3p1-pool2-conv64k3p1-pool2-fc10",
    ),
];

/// A parsed model description; [`ModelSpec::builder`] resolves it against an input shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    text: String,
    tokens: Vec<String>,
}

/// An invalid-spec error; a spec longer than 100 characters is shown by its first 100.
fn err(spec: &str, reason: impl Into<String>) -> ModelError {
    let shown = match spec.char_indices().nth(100) {
        Some((at, _)) => format!("{}...", &spec[..at]),
        None => spec.to_string(),
    };
    ModelError::InvalidSpec {
        spec: shown,
        reason: reason.into(),
    }
}

/// Splits on `-` outside brackets.
fn split_top(text: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for ch in text.chars() {
        match ch {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced `]`".into());
                }
            }
            '-' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if depth != 0 {
        return Err("unbalanced `[`".into());
    }
    parts.push(cur);
    if parts.iter().any(|p| p.trim().is_empty()) {
        return Err("empty token (two `-` in a row, or a leading or trailing `-`)".into());
    }
    Ok(parts.into_iter().map(|p| p.trim().to_string()).collect())
}

fn number(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn input_shape(token: &str) -> Option<Shape> {
    if let Some(n) = number(token) {
        return Some(Shape::Flat(n));
    }
    let dims: Vec<usize> = token.split('x').map(number).collect::<Option<_>>()?;
    match dims[..] {
        [c, h, w] => Some(Shape::Image { c, h, w }),
        _ => None,
    }
}

/// Parses `convCkK[sS][pP]`.
fn conv(token: &str) -> Option<LayerKind> {
    let rest = token.strip_prefix("conv")?;
    let (c, rest) = rest.split_once('k')?;
    let mut kernel_end = rest.len();
    for (i, ch) in rest.char_indices() {
        if ch == 's' || ch == 'p' {
            kernel_end = i;
            break;
        }
    }
    let kernel = number(&rest[..kernel_end])?;
    let mut stride = 1;
    let mut padding = 0;
    let mut tail = &rest[kernel_end..];
    while !tail.is_empty() {
        let key = tail.as_bytes()[0];
        let end = tail[1..].find(['s', 'p']).map_or(tail.len(), |i| i + 1);
        let value = number(&tail[1..end])?;
        match key {
            b's' => stride = value,
            b'p' => padding = value,
            _ => return None,
        }
        tail = &tail[end..];
    }
    Some(LayerKind::Conv2d {
        channels: number(c)?,
        kernel,
        stride,
        padding,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Form {
    Flat,
    Spatial,
}

struct Expander<'a> {
    spec: &'a str,
    pending_activation: bool,
    form: Form,
}

impl Expander<'_> {
    fn expand(&mut self, tokens: &[String], out: &mut Vec<LayerKind>) -> Result<(), ModelError> {
        for token in tokens {
            let t = token.as_str();
            let digits_at = t.find(|c: char| c.is_ascii_digit());
            if let Some(i) = digits_at {
                let value: String = t[i..].chars().take_while(char::is_ascii_digit).collect();
                if value.parse::<usize>() == Ok(0) && !t.starts_with("drop") {
                    return Err(err(self.spec, format!("`{t}`: sizes must be positive")));
                }
            }
            if let Some(inner) = t.strip_prefix("res[").and_then(|r| r.strip_suffix(']')) {
                // Said before any recursion: each level would copy the rest of the spec,
                // so a deep nest cost quadratic time before the builder refused it.
                if inner.contains("res[") {
                    return Err(err(self.spec, "residual blocks cannot be nested"));
                }
                let inner_tokens = split_top(inner).map_err(|e| err(self.spec, e))?;
                let mut block = Vec::new();
                self.expand(&inner_tokens, &mut block)?;
                out.push(LayerKind::Residual(block));
                continue;
            }
            let layer = if let Some(a) = Activation::from_name(t) {
                self.pending_activation = false;
                out.push(LayerKind::Activation(a));
                continue;
            } else if t == "id" {
                self.pending_activation = false;
                continue;
            } else if let Some(n) = number(t).or_else(|| t.strip_prefix("fc").and_then(number)) {
                if self.form != Form::Flat {
                    self.activate(out);
                    out.push(LayerKind::Flatten);
                    self.form = Form::Flat;
                }
                LayerKind::Linear { outputs: n }
            } else if let Some(c) = conv(t) {
                self.form = Form::Spatial;
                c
            } else if let Some(k) = t
                .strip_prefix("maxpool")
                .or_else(|| t.strip_prefix("pool"))
                .and_then(number)
            {
                LayerKind::MaxPool2d {
                    kernel: k,
                    stride: k,
                }
            } else if let Some(k) = t.strip_prefix("avgpool").and_then(number) {
                LayerKind::AvgPool2d {
                    kernel: k,
                    stride: k,
                }
            } else if t == "ln" {
                out.push(LayerKind::LayerNorm);
                continue;
            } else if t == "bn" {
                out.push(LayerKind::BatchNorm);
                continue;
            } else if t == "flatten" {
                self.form = Form::Flat;
                out.push(LayerKind::Flatten);
                continue;
            } else if let Some(p) = t.strip_prefix("drop") {
                let p: f32 = p
                    .parse()
                    .map_err(|_| err(self.spec, format!("`{t}`: expected dropP, like drop0.2")))?;
                out.push(LayerKind::Dropout { p });
                continue;
            } else if let Some(n) = t.strip_prefix("tokens").and_then(number) {
                self.form = Form::Spatial;
                out.push(LayerKind::Tokens { tokens: n });
                continue;
            } else if let Some(h) = t.strip_prefix("attn").and_then(number) {
                LayerKind::Attention { heads: h }
            } else {
                return Err(err(
                    self.spec,
                    format!(
                        "unknown token `{t}` (expected a width, fcN, convCkK[sS][pP], poolK, avgpoolK, an activation ({}), id, ln, bn, dropP, flatten, tokensT, attnH or res[...])",
                        Activation::NAMES
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            };
            self.activate(out);
            let is_state = matches!(
                layer,
                LayerKind::Linear { .. } | LayerKind::Conv2d { .. } | LayerKind::Attention { .. }
            );
            out.push(layer);
            if is_state {
                self.pending_activation = true;
            }
        }
        Ok(())
    }

    fn activate(&mut self, out: &mut Vec<LayerKind>) {
        if self.pending_activation {
            out.push(LayerKind::Activation(Activation::Relu));
            self.pending_activation = false;
        }
    }
}

impl ModelSpec {
    /// A fully connected spec from explicit widths (input first, output last).
    pub fn from_sizes(sizes: &[usize]) -> Result<Self, ModelError> {
        let text = sizes
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("-");
        text.parse()
    }

    /// The spec as written (named models expanded).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The input shape the spec declares, if its first token is one.
    pub fn declared_input(&self) -> Option<Shape> {
        input_shape(&self.tokens[0])
    }

    /// The layer chain for inputs of shape `data` (the data set's sample shape). A declared
    /// input must have as many features as `data`; it then takes precedence.
    pub fn builder(&self, data: Shape) -> Result<NetworkBuilder, ModelError> {
        let (input, rest) = match self.declared_input() {
            Some(declared) => {
                if declared.numel() != data.numel() {
                    return Err(err(
                        &self.text,
                        format!(
                            "the spec's input has {} features, the data {} ({data})",
                            declared.numel(),
                            data.numel()
                        ),
                    ));
                }
                (declared, &self.tokens[1..])
            }
            None => (data, &self.tokens[..]),
        };
        if rest.is_empty() {
            return Err(err(&self.text, "no layers after the input"));
        }
        Ok(self
            .expand(rest, input)?
            .into_iter()
            .fold(NetworkBuilder::new(input), NetworkBuilder::layer))
    }

    /// The layers of `tokens` (the spec after its input) for inputs of shape `input`.
    fn expand(&self, tokens: &[String], input: Shape) -> Result<Vec<LayerKind>, ModelError> {
        let mut expander = Expander {
            spec: &self.text,
            pending_activation: false,
            form: if matches!(input, Shape::Flat(_)) {
                Form::Flat
            } else {
                Form::Spatial
            },
        };
        let mut layers = Vec::new();
        expander.expand(tokens, &mut layers)?;
        Ok(layers)
    }

    /// Builds the network for inputs of shape `data` (see [`ModelSpec::builder`]); shape
    /// errors name this spec.
    pub fn build(
        &self,
        data: Shape,
        seed: u64,
        device: &crate::device::Device,
    ) -> Result<super::Network, ModelError> {
        self.builder(data)?
            .build(seed, device)
            .map_err(|e| match e {
                ModelError::InvalidSpec { reason, .. } => err(&self.text, reason),
                other => other,
            })
    }

    /// How many layers hold a state of the EP energy (linear layers, convolutions and
    /// attention, those inside residual blocks included): the settle steps a nudge at the
    /// output needs to reach every layer. Read with the spec's declared input, else an
    /// image input.
    pub fn state_layers(&self) -> Result<usize, ModelError> {
        // Any image shape reads the layers as an image input does.
        let image = Shape::Image { c: 1, h: 1, w: 1 };
        let layers = match self.declared_input() {
            Some(input) => self.expand(&self.tokens[1..], input)?,
            None => self.expand(&self.tokens, image)?,
        };
        fn count(layers: &[LayerKind]) -> usize {
            layers
                .iter()
                .map(|l| match l {
                    LayerKind::Linear { .. }
                    | LayerKind::Conv2d { .. }
                    | LayerKind::Attention { .. } => 1,
                    LayerKind::Residual(block) => count(block),
                    _ => 0,
                })
                .sum()
        }
        Ok(count(&layers))
    }

    /// The layer chain with the spec's own declared input (an error if it declares none).
    pub fn standalone(&self) -> Result<NetworkBuilder, ModelError> {
        let input = self.declared_input().ok_or_else(|| {
            err(
                &self.text,
                "the spec does not start with an input shape (N or CxHxW)",
            )
        })?;
        self.builder(input)
    }
}

impl FromStr for ModelSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let expanded = NAMED_MODELS
            .iter()
            .find(|(name, _)| *name == text)
            .map_or(text, |(_, spec)| *spec);
        if expanded.is_empty() {
            return Err(err(s, "empty spec"));
        }
        let tokens = split_top(expanded).map_err(|e| err(s, e))?;
        let spec = Self {
            text: expanded.to_string(),
            tokens,
        };
        // Resolve once against the declared (or a dummy flat) input to reject bad tokens
        // early; shape errors need the real input and surface when the network is built.
        let probe = spec.declared_input().unwrap_or(Shape::Flat(1));
        spec.builder(probe).map_err(|e| match e {
            ModelError::InvalidSpec { reason, .. } => err(s, reason),
            other => other,
        })?;
        Ok(spec)
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
