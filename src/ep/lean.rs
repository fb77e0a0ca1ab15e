//! EP in the least memory the algorithm needs, for dense layered networks.
//!
//! Everything here is burn tensor operations on the network's own parameters (no copy of
//! the weights), and the only values kept per layer are the free states, the states being
//! settled and their momentum buffers. A settle step sweeps the layers from the top: state
//! `i`'s gradient `g_i = -e_i + f'(s_i) (e_{i+1} W_{i+1}^T) [+ e_{i+1}]` needs only the
//! errors `e_i` and `e_{i+1}`, both computed from states not yet moved in this sweep, so the
//! state is updated at once and the sweep keeps two error tensors alive instead of every
//! layer's tape. The contrast sweeps the same way and frees each state as soon as its
//! layer's gradient is formed, so the parameter gradients grow while the states shrink.
//! Peak memory: the parameters, three state-shaped values per layer and O(1) layers of
//! temporaries during settling; the parameters, their gradients and O(1) layers during the
//! contrast. Nothing grows with the number of settle steps.
//!
//! The iteration is the one of [`super::Settler`] (heavy-ball on the per-sample energy,
//! checks every `check_every` steps) with one difference: the residual of a check is
//! computed in the same sweep that moves the states, so a settle that converges at a
//! check still takes that step (one more than the other loops). With `tol = 0` the
//! iterates are the same (`tests/settle.rs`).

use super::convergence::{ResidualCheck, SettleConfig, SettleError, SettleStats};
use super::energy::{DensePlan, EnergyModel};
use crate::device::{Tensor, to_host};
use crate::model::{Network, NormStats};

/// A dense network's structure with its parameters.
pub(crate) struct LeanChain<'a> {
    net: &'a Network,
    plan: &'a DensePlan,
    model: &'a EnergyModel,
    /// The batch's inputs.
    x: &'a Tensor<2>,
}

/// One nudged phase's outcome: `sum_batch dE/dtheta` at its settled states.
pub(crate) struct LeanPhase {
    /// Parameter terms, indexed like the network's parameters.
    pub terms: Vec<Tensor<2>>,
    /// What the settle did.
    pub stats: SettleStats,
    /// Residual at every check.
    pub curve: Vec<(usize, f32)>,
}

impl<'a> LeanChain<'a> {
    /// The chain of `net` (whose energy is `model` and plan `plan`) for inputs `x`.
    pub(crate) fn new(
        net: &'a Network,
        plan: &'a DensePlan,
        model: &'a EnergyModel,
        x: &'a Tensor<2>,
    ) -> Self {
        Self {
            net,
            plan,
            model,
            x,
        }
    }

    /// Whether the first state's layers suit the lean path: no batch norm and no
    /// parameters before the first state layer.
    pub(crate) fn supports(net: &Network, model: &EnergyModel) -> bool {
        let chain: Vec<usize> = model.first_chain().collect();
        chain[..chain.len() - 1].iter().all(|&i| {
            let layer = &net.layers()[i];
            layer.num_params == 0 && !matches!(layer.op, crate::model::LayerOp::BatchNorm { .. })
        })
    }

    fn link_params(&self, i: usize) -> &'a [Tensor<2>] {
        let layer = &self.net.layers()[self.plan.links[i - 1].0];
        layer.params(self.net.params())
    }

    /// The prediction `h_i` of state `i >= 1` from the state below.
    fn predict(&self, i: usize, below: &Tensor<2>) -> Tensor<2> {
        let p = self.link_params(i);
        let input = match self.plan.links[i - 1].1 {
            Some(a) => a.apply(below.clone()),
            None => below.clone(),
        };
        let h = input.matmul(p[0].clone()) + p[1].clone();
        if self.plan.residual[i - 1] {
            h + below.clone()
        } else {
            h
        }
    }

    /// What state `i`'s gradient receives from the error `e_next` of state `i + 1`:
    /// `f'(s_i) (e_{i+1} W^T)`, plus `e_{i+1}` through a residual link.
    fn feedback(&self, i: usize, s: &Tensor<2>, e_next: &Tensor<2>) -> Tensor<2> {
        let p = self.link_params(i + 1);
        let back = e_next.clone().matmul(p[0].clone().transpose());
        let back = match self.plan.links[i].1 {
            Some(a) => a.vjp(s, back),
            None => back,
        };
        if self.plan.residual[i] {
            back + e_next.clone()
        } else {
            back
        }
    }

    /// The first state's prediction from the input (its segment's layers).
    pub(crate) fn first_prediction(&self) -> Tensor<2> {
        self.model.first_chain().fold(self.x.clone(), |v, index| {
            let layer = &self.net.layers()[index];
            layer.apply(layer.params(self.net.params()), v, &NormStats::Batch)
        })
    }

    /// The free phase: the forward pass, state by state.
    pub(crate) fn free_states(&self, first: &Tensor<2>) -> Vec<Tensor<2>> {
        let depth = self.plan.widths.len();
        let mut states = Vec::with_capacity(depth);
        states.push(first.clone());
        for i in 1..depth {
            let h = self.predict(i, &states[i - 1]);
            states.push(h);
        }
        states
    }

    /// Settles at nudge `beta` from `start` and returns the phase's parameter terms.
    pub(crate) fn phase(
        &self,
        config: &SettleConfig,
        first: &Tensor<2>,
        targets: &Tensor<2>,
        mut states: Vec<Tensor<2>>,
        beta: f32,
    ) -> Result<LeanPhase, SettleError> {
        let depth = states.len();
        let loss = self.model.loss();
        let mut momentum: Vec<Option<Tensor<2>>> = vec![None; depth];
        let mut residuals = ResidualCheck::new(config, beta);
        let mut stats = SettleStats {
            step: config.lr,
            ..SettleStats::default()
        };
        let mut curve = Vec::new();
        loop {
            let check = stats.steps.is_multiple_of(config.check_every);
            let moving = stats.steps < config.steps;
            if !check && !moving {
                break;
            }
            let mut layer_max: Vec<Tensor<1>> = Vec::with_capacity(depth);
            let mut total: Option<Tensor<2>> = None;
            let mut e_next: Option<Tensor<2>> = None;
            for i in (0..depth).rev() {
                let h = if i == 0 {
                    first.clone()
                } else {
                    self.predict(i, &states[i - 1])
                };
                let e = h - states[i].clone();
                let mut g = e.clone().neg();
                if let Some(e_next) = &e_next {
                    g = g + self.feedback(i, &states[i], e_next);
                } else if beta != 0.0 {
                    g = g + loss
                        .gradient(states[i].clone(), targets.clone())
                        .mul_scalar(beta);
                }
                if check {
                    let sq = g.clone().powi_scalar(2).sum_dim(1);
                    layer_max.push(sq.clone().max());
                    total = Some(match total {
                        Some(t) => t + sq,
                        None => sq,
                    });
                }
                if moving {
                    let m = match momentum[i].take() {
                        Some(m) => m.mul_scalar(config.momentum) + g,
                        None => g,
                    };
                    states[i] = states[i].clone() - m.clone().mul_scalar(config.lr);
                    momentum[i] = Some(m);
                }
                e_next = Some(e);
            }
            if let Some(total) = total {
                // One host read per check: the top layer was swept first.
                layer_max.push(total.max());
                let mut maxima: Vec<f32> = to_host(&Tensor::cat(layer_max, 0))
                    .into_iter()
                    .map(f32::sqrt)
                    .collect();
                let total = maxima.pop().expect("the total was pushed last");
                maxima.reverse();
                let layer_max = maxima;
                let converged = residuals.check(
                    &layer_max,
                    total,
                    self.model.state_names(),
                    &mut stats,
                    &mut curve,
                )?;
                if converged {
                    stats.converged = true;
                    if moving {
                        stats.steps += 1;
                    }
                    break;
                }
            }
            if !moving {
                break;
            }
            stats.steps += 1;
        }
        drop(momentum);
        stats.sample_steps = stats.steps as f32;
        let (terms, energy) = self.contrast(first, targets, states, beta);
        stats.energy = energy;
        Ok(LeanPhase {
            terms,
            stats,
            curve,
        })
    }

    /// `sum_batch dE/dtheta` at `states`, top layer first, freeing each state once its
    /// layer is done; also the mean per-sample energy there.
    fn contrast(
        &self,
        first: &Tensor<2>,
        targets: &Tensor<2>,
        mut states: Vec<Tensor<2>>,
        beta: f32,
    ) -> (Vec<Tensor<2>>, f32) {
        let depth = states.len();
        let batch = first.dims()[0] as f32;
        let mut terms: Vec<Option<Tensor<2>>> = vec![None; self.net.params().len()];
        let output = states.last().expect("at least one state").clone();
        let mut energy = self
            .model
            .loss()
            .per_sample(output, targets.clone())
            .sum()
            .mul_scalar(beta);
        for i in (0..depth).rev() {
            let s = states.pop().expect("one state per layer");
            if i == 0 {
                let e = first.clone() - s;
                energy = energy + e.clone().powi_scalar(2).sum().mul_scalar(0.5);
                self.first_terms(&e, &mut terms);
                break;
            }
            let below = &states[i - 1];
            let e = self.predict(i, below) - s;
            energy = energy + e.clone().powi_scalar(2).sum().mul_scalar(0.5);
            let input = match self.plan.links[i - 1].1 {
                Some(a) => a.apply(below.clone()),
                None => below.clone(),
            };
            let first_param = self.net.layers()[self.plan.links[i - 1].0].first_param;
            terms[first_param] = Some(input.transpose().matmul(e.clone()));
            terms[first_param + 1] = Some(e.sum_dim(0));
        }
        let terms = terms
            .into_iter()
            .zip(self.net.params())
            .map(|(t, p)| t.unwrap_or_else(|| Tensor::zeros(p.dims(), &p.device())))
            .collect();
        (terms, to_host(&energy)[0] / batch)
    }

    /// The first segment's parameter terms for its error `e`: recompute its chain from
    /// the input and take its state layer's parameter VJP.
    fn first_terms(&self, e: &Tensor<2>, terms: &mut [Option<Tensor<2>>]) {
        let chain: Vec<usize> = self.model.first_chain().collect();
        let (&last, prefix) = chain.split_last().expect("a segment has a state layer");
        let layers = self.net.layers();
        let params = self.net.params();
        let x = self.x.clone();
        let input = prefix.iter().fold(x, |v, &index| {
            let layer = &layers[index];
            layer.apply(layer.params(params), v, &NormStats::Batch)
        });
        let layer = &layers[last];
        let p = layer.params(params);
        let (_, aux) = layer.forward_taped(p, &input, &NormStats::Batch);
        for (k, g) in layer.vjp_params(p, &input, &aux, e).into_iter().enumerate() {
            terms[layer.first_param + k] = Some(g);
        }
    }
}
