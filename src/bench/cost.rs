//! The cost model: matrix-product FLOPs of one EP gradient, one backprop step and one
//! Muon update, for any network, so measured times can be read against the hardware.

use crate::ep::EnergyModel;
use crate::loss::Loss;
use crate::model::{Network, ParamKind};
use crate::optim::NsIteration;
use crate::optim::linalg::{newton_schulz_flops, newton_schulz_host_flops};

/// Matrix-product FLOPs of the parts of a training step (element-wise work is not counted).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CostModel {
    /// The forward pass (EP's free phase), per sample.
    pub forward_per_sample: f64,
    /// One settle step (each state layer's prediction and feedback), per sample.
    pub settle_step_per_sample: f64,
    /// The contrast (one parameter VJP per state layer per nudged phase), per sample.
    pub contrast_per_sample: f64,
    /// One EP gradient with `settle_steps` steps and `phases` nudged phases, per sample.
    pub ep_gradient_per_sample: f64,
    /// One backprop gradient (forward, input and parameter VJPs), per sample.
    pub backprop_per_sample: f64,
    /// One Muon update of every matrix (5 Newton–Schulz steps of the given iteration) as
    /// computed on the network's device, per optimizer step (independent of the batch size).
    pub muon_update: f64,
    /// Settle steps per phase assumed.
    pub settle_steps: usize,
    /// Nudged phases assumed.
    pub phases: usize,
}

impl CostModel {
    /// The cost model of `net` for EP with `settle_steps` steps per phase and `phases`
    /// nudged phases (1 one-sided, 2 centered), updated by Muon with `iteration`.
    pub fn new(net: &Network, settle_steps: usize, phases: usize, iteration: NsIteration) -> Self {
        let energy = EnergyModel::new(net, Loss::default());
        let forward = net.layers().iter().map(|l| l.forward_flops(1)).sum::<f64>();
        let settle = energy.settle_step_flops(net, 1);
        let ep = energy.gradient_flops(net, 1, settle_steps, phases);
        let contrast = ep - forward - (settle_steps * phases) as f64 * settle;
        let host = net
            .params()
            .first()
            .is_some_and(|p| crate::device::is_host(&p.device()));
        let ns = if host {
            newton_schulz_host_flops
        } else {
            newton_schulz_flops
        };
        let muon = net
            .param_info()
            .iter()
            .map(|p| match p.kind {
                ParamKind::Matrix {
                    fan_in, fan_out, ..
                } => ns(fan_out, fan_in, 5, iteration),
                ParamKind::Vector => 0.0,
            })
            .sum();
        Self {
            forward_per_sample: forward,
            settle_step_per_sample: settle,
            contrast_per_sample: contrast,
            ep_gradient_per_sample: ep,
            // Backward = input VJP + parameter VJP, each as costly as the forward.
            backprop_per_sample: 3.0 * forward,
            muon_update: muon,
            settle_steps,
            phases,
        }
    }

    /// FLOPs of one epoch of `samples` samples in batches of `batch`: EP's gradients plus,
    /// with `muon`, one Muon update per batch.
    pub fn ep_epoch(&self, samples: usize, batch: usize, muon: bool) -> f64 {
        let steps = samples.div_ceil(batch.max(1)) as f64;
        samples as f64 * self.ep_gradient_per_sample
            + if muon { steps * self.muon_update } else { 0.0 }
    }

    /// FLOPs of one backprop epoch (the optimizer's element-wise update is not counted).
    pub fn backprop_epoch(&self, samples: usize) -> f64 {
        samples as f64 * self.backprop_per_sample
    }
}
