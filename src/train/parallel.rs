//! Data-parallel training: the collective operations a run spread over several processes
//! needs, and how a step's results are combined.
//!
//! Every rank draws the same global batches (the batch order depends only on the seed and
//! the epoch), estimates the gradient of its contiguous share of each batch
//! ([`share`]), and the shares are combined through gathers: every rank receives every
//! rank's packed results ([`StepShare`]), so the combined step depends only on the batch,
//! never on timing, and every rank then takes the same optimizer step.
//!
//! - Gradients the estimator leaves to per-sample factors (EP's linear weights and biases,
//!   [`crate::estimate::Estimate::factored`]) travel as those factors, a fraction of the
//!   bytes while a rank's share of the batch is small against the layer's width. Every
//!   rank multiplies out its [`share`] of each weight's rows over the whole batch, in batch
//!   order, and a second gather assembles the rows; a bias is the column sums of the same
//!   factors. Each such gradient is then the very computation one process does on the
//!   whole batch ([`crate::train::Trainer::new`]): the same bits for any number of ranks.
//! - Other gradients travel whole, as each share's mean, and are summed **in rank order**,
//!   weighted by share size: against one process, reassociated (equal to rounding, not to
//!   the bit).
//!
//! The transport is a [`Collective`]: MPI (`mpi` feature, `train::mpi`) or anything
//! else that can gather.

use std::fmt::Debug;
use std::ops::Range;

use crate::device::{Device, Tensor, from_host, into_host, to_host};
use crate::ep::SettleStats;
use crate::model::{BatchMoments, Factored, GradFactors, column_means, weight_rows};
pub use crate::optim::split_parts;

/// Errors of a collective operation.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    /// The transport failed.
    #[error("collective operation failed: {0}")]
    Transport(String),
    /// Ranks disagree (options, data, parameters).
    #[error("ranks disagree: {0}")]
    Mismatch(String),
}

/// Collective operations over the processes (ranks) of one run. Every rank must call the
/// same operations in the same order.
pub trait Collective: Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` (lengths may differ), concatenated in rank order into `out`
    /// (its previous values replaced, its allocation reused); returns each rank's length.
    fn all_gather_f32_into(
        &self,
        local: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<Vec<usize>, ParallelError>;
    /// Every rank's `local` (lengths may differ), in rank order.
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, ParallelError> {
        let mut out = Vec::new();
        let counts = self.all_gather_f32_into(local, &mut out)?;
        Ok(split_parts(&out, &counts)
            .into_iter()
            .map(<[f32]>::to_vec)
            .collect())
    }
    /// Every rank's `local` (lengths may differ), in rank order.
    fn all_gather_u64(&self, local: &[u64]) -> Result<Vec<Vec<u64>>, ParallelError>;
    /// Traffic and time so far.
    fn stats(&self) -> CommStats;
}

/// What the collectives of a run have cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CommStats {
    /// Collective calls.
    pub calls: u64,
    /// Bytes this rank sent (its contribution to each gather).
    pub bytes_sent: u64,
    /// Bytes this rank received from the others.
    pub bytes_received: u64,
    /// Seconds spent inside collectives (waiting for other ranks included).
    pub seconds: f64,
    /// Of those, seconds spent in each gather's first exchange, of its length alone: in
    /// effect waiting for the slowest rank to arrive, so `seconds - waiting` is about the
    /// time the transfers take.
    pub waiting: f64,
}

/// The contiguous share of `n` items that `rank` of `size` takes: items
/// `n * rank / size .. n * (rank + 1) / size`, so shares differ by at most one item.
pub fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    (n * rank / size)..(n * (rank + 1) / size)
}

/// Checks that every rank holds the same `digest` (of its options, data and seed); the
/// error names the first rank that differs from rank 0.
pub fn check_agreement(
    collective: &dyn Collective,
    digest: &[u64],
    what: &str,
) -> Result<(), ParallelError> {
    let all = collective.all_gather_u64(digest)?;
    match all.iter().position(|d| d != &all[0]) {
        Some(rank) => Err(ParallelError::Mismatch(format!(
            "rank {rank}'s {what} differ from rank 0's: every rank must be started with the same options, seed and data"
        ))),
        None => Ok(()),
    }
}

/// The optimizer's view of a collective ([`crate::optim::WorkSplit`]): the ranks share
/// its step's heaviest work (Muon's Newton–Schulz) through the same gathers.
#[derive(Debug)]
pub struct SplitOver(pub std::rc::Rc<dyn Collective>);

impl crate::optim::WorkSplit for SplitOver {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn exchange(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, crate::optim::OptimError> {
        self.0
            .all_gather_f32(local)
            .map_err(|e| crate::optim::OptimError::Exchange(e.to_string()))
    }

    fn exchange_into(
        &self,
        local: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<Vec<usize>, crate::optim::OptimError> {
        self.0
            .all_gather_f32_into(local, out)
            .map_err(|e| crate::optim::OptimError::Exchange(e.to_string()))
    }
}

/// A 64-bit FNV-1a digest of `bytes` (rank agreement checks, not security).
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One rank's results for its share of a batch, packed for one gather.
pub struct StepShare<'a> {
    /// Samples in the share.
    pub samples: usize,
    /// Mean loss over the share.
    pub loss: f32,
    /// Correct predictions in the share.
    pub correct: usize,
    /// The share's settle statistics, per phase.
    pub settle: &'a [SettleStats],
    /// The share's mean gradient per parameter (moved into the packing: each is read
    /// once, in place when nothing else holds it).
    pub grads: Vec<Tensor<2>>,
    /// Parameters whose gradients are not gathered: the optimizer combines them across
    /// the ranks itself ([`crate::optim::Optimizer::reduces_across_ranks`]; empty: none).
    pub local: &'a [bool],
    /// Per-sample gradient factors (rows of this share), per parameter.
    pub factors: &'a [Option<GradFactors>],
    /// Parameters whose gradient is left to their factors ([`crate::estimate::Estimate::factored`];
    /// their `grads` entries are empty): only the factors travel, and every rank multiplies
    /// out the whole batch's.
    pub factored: &'a [Option<Factored>],
    /// Batch-norm moments of the share.
    pub moments: &'a BatchMoments,
}

/// The whole batch's results, combined from every rank's share.
pub struct StepTotal {
    /// Samples in the batch.
    pub samples: usize,
    /// Mean loss over the batch.
    pub loss: f32,
    /// Correct predictions in the batch.
    pub correct: usize,
    /// Settle statistics per phase: steps and residual the largest of any share,
    /// converged only where every share converged, per-sample steps averaged.
    pub settle: Vec<SettleStats>,
    /// The batch's mean gradient per parameter; for the parameters marked `local`, this
    /// rank's share of it (its samples' gradient sum over the batch's size), which sums to
    /// the batch's mean over the ranks.
    pub grads: Vec<Tensor<2>>,
    /// Per-sample factors of the whole batch (rows in rank order, so in batch order).
    pub factors: Vec<Option<GradFactors>>,
    /// Batch-norm moments of the whole batch.
    pub moments: BatchMoments,
}

/// The host buffers a data-parallel run packs and gathers its steps in, kept from step to
/// step so that, once grown, a step's exchange allocates and faults in no fresh pages.
#[derive(Debug, Default)]
pub struct StepBuffers {
    packed: Vec<f32>,
    gathered: Vec<f32>,
    /// This rank's rows of the factored gradients, and every rank's.
    rows: Vec<f32>,
    gathered_rows: Vec<f32>,
}

const HEADER: usize = 4;
const PER_PHASE: usize = 4;

impl StepShare<'_> {
    /// Packs the share, gathers every rank's and combines them: sums in rank order of
    /// each rank's values weighted by its sample count, over the batch's sample count.
    pub fn combine(
        self,
        collective: &dyn Collective,
        device: &Device,
        buffers: &mut StepBuffers,
    ) -> Result<StepTotal, ParallelError> {
        let n = self.samples as f32;
        let packed = &mut buffers.packed;
        packed.clear();
        packed.extend([
            n,
            self.loss * n,
            self.correct as f32,
            self.settle.len() as f32,
        ]);
        for s in self.settle {
            packed.extend([
                s.sample_steps * n,
                s.residual,
                f32::from(u8::from(s.converged)),
                s.steps as f32,
            ]);
        }
        // Gradients travel as the share's means; the receivers weight them.
        let mut shapes = Vec::with_capacity(self.grads.len());
        let mut kept = Vec::with_capacity(self.grads.len());
        for (k, g) in self.grads.into_iter().enumerate() {
            if let Some(how) = self.factored.get(k).copied().flatten() {
                let source = match how {
                    Factored::Weight => k,
                    Factored::BiasOf(j) => j,
                };
                let f = self.factors.get(source).and_then(Option::as_ref);
                let f = f.ok_or_else(|| {
                    ParallelError::Mismatch(format!("parameter {k} is factored without factors"))
                })?;
                let outputs = f.output_grads.dims()[1];
                shapes.push(match how {
                    Factored::Weight => [f.inputs.dims()[1], outputs],
                    Factored::BiasOf(_) => [1, outputs],
                });
                kept.push(None);
                continue;
            }
            shapes.push(g.dims());
            if self.local.get(k).copied().unwrap_or(false) {
                kept.push(Some(g));
            } else {
                packed.extend_from_slice(&into_host(g));
                kept.push(None);
            }
        }
        for (mean, var) in self.moments {
            packed.extend(mean.iter().map(|m| m * n));
            packed.extend(mean.iter().zip(var).map(|(m, v)| (v + m * m) * n));
        }
        for f in self.factors.iter().flatten() {
            packed.extend(to_host(&f.inputs));
            packed.extend(to_host(&f.output_grads));
        }
        let counts = collective.all_gather_f32_into(packed, &mut buffers.gathered)?;
        let all = split_parts(&buffers.gathered, &counts);
        let mut total = Unpacked {
            samples: self.samples,
            settle: self.settle,
            moments: self.moments,
            factors: self.factors,
            factored: self.factored,
        }
        .unpack(&all, &shapes, kept, device, collective, &mut buffers.rows)?;
        let weight = |k: usize| self.factored.get(k) == Some(&Some(Factored::Weight));
        if (0..self.factored.len()).any(weight) {
            // Every rank's rows of the factored gradients, assembled in rank order.
            let (rank_count, me) = (collective.size(), collective.rank());
            let counts =
                collective.all_gather_f32_into(&buffers.rows, &mut buffers.gathered_rows)?;
            let parts = split_parts(&buffers.gathered_rows, &counts);
            let mut at = vec![0; rank_count];
            for (k, &[inputs, outputs]) in shapes.iter().enumerate() {
                if !weight(k) {
                    continue;
                }
                let mut full = Vec::with_capacity(inputs * outputs);
                for (rank, (part, at)) in parts.iter().zip(&mut at).enumerate() {
                    let len = share(inputs, rank, rank_count).len() * outputs;
                    let rows = part.get(*at..*at + len).ok_or_else(|| {
                        ParallelError::Mismatch(format!(
                            "rank {rank} sent too few gradient rows (rank {me} expected {len})"
                        ))
                    })?;
                    full.extend_from_slice(rows);
                    *at += len;
                }
                total.grads[k] = from_host(full, [inputs, outputs], device);
            }
        }
        Ok(total)
    }
}

/// `sum_r parts[r][i] weights[r]`, summed in rank order, over `total`, for every `i` (the
/// parts have equal lengths): one pass over each part, in blocks that stay in the
/// first-level cache, written straight into the result.
fn weighted_mean(parts: &[&[f32]], weights: &[f32], total: f32) -> Vec<f32> {
    const BLOCK: usize = 2048;
    let len = parts.first().map_or(0, |p| p.len());
    let mut out = Vec::with_capacity(len);
    let mut block = [0f32; BLOCK];
    for start in (0..len).step_by(BLOCK) {
        let end = (start + BLOCK).min(len);
        let sum = &mut block[..end - start];
        sum.fill(0.0);
        for (part, &w) in parts.iter().zip(weights) {
            for (s, v) in sum.iter_mut().zip(&part[start..end]) {
                *s += v * w;
            }
        }
        out.extend(sum.iter().map(|s| s / total));
    }
    out
}

/// What combining needs of this rank's share besides the gathered values.
struct Unpacked<'a> {
    samples: usize,
    settle: &'a [SettleStats],
    moments: &'a BatchMoments,
    factors: &'a [Option<GradFactors>],
    factored: &'a [Option<Factored>],
}

impl Unpacked<'_> {
    /// The batch's totals from every rank's packed share (`all`); the factored gradients
    /// are left empty, and this rank's rows of each (its [`share`] of the weight's rows,
    /// from the whole batch's factors) are written to `rows`.
    fn unpack(
        &self,
        all: &[&[f32]],
        shapes: &[[usize; 2]],
        kept: Vec<Option<Tensor<2>>>,
        device: &Device,
        collective: &dyn Collective,
        rows: &mut Vec<f32>,
    ) -> Result<StepTotal, ParallelError> {
        let bad = |rank: usize, what: &str| {
            ParallelError::Mismatch(format!("rank {rank} sent a malformed step ({what})"))
        };
        let mut readers = Vec::with_capacity(all.len());
        let mut weights = Vec::with_capacity(all.len());
        for (rank, p) in all.iter().enumerate() {
            let phases = HEADER + self.settle.len() * PER_PHASE;
            if p.len() < phases || p[3] as usize != self.settle.len() {
                return Err(bad(rank, "header or settle phases"));
            }
            weights.push(p[0]);
            readers.push(phases);
        }
        let samples: usize = weights.iter().map(|&w| w as usize).sum();
        if samples == 0 {
            return Err(ParallelError::Mismatch("a batch without samples".into()));
        }
        let total = samples as f32;
        let loss = all.iter().map(|p| p[1]).sum::<f32>() / total;
        let correct = all.iter().map(|p| p[2] as usize).sum();
        let mut settle = self.settle.to_vec();
        for (phase, s) in settle.iter_mut().enumerate() {
            let at = |p: &&[f32], k: usize| p[HEADER + phase * PER_PHASE + k];
            s.sample_steps = all.iter().map(|p| at(p, 0)).sum::<f32>() / total;
            s.residual = all.iter().map(|p| at(p, 1)).fold(0.0, f32::max);
            s.converged = all.iter().all(|p| at(p, 2) > 0.5);
            s.steps = all.iter().map(|p| at(p, 3) as usize).max().unwrap_or(0);
        }
        // The next `len` values of every rank, each times its weight (none: as sent),
        // summed in rank order, over the batch's samples.
        let mut summed = |len: usize, weighted: bool| -> Result<Vec<f32>, ParallelError> {
            let mut parts = Vec::with_capacity(all.len());
            for (rank, (p, at)) in all.iter().zip(readers.iter_mut()).enumerate() {
                parts.push(
                    p.get(*at..*at + len)
                        .ok_or_else(|| bad(rank, "too short"))?,
                );
                *at += len;
            }
            let ones = vec![1.0; parts.len()];
            Ok(weighted_mean(
                &parts,
                if weighted { &weights } else { &ones },
                total,
            ))
        };
        let factored = |k: usize| self.factored.get(k).is_some_and(Option::is_some);
        let mut grads = Vec::with_capacity(shapes.len());
        for (k, (&dims, kept)) in shapes.iter().zip(kept).enumerate() {
            grads.push(match kept {
                // Filled in from the whole batch's factors below.
                _ if factored(k) => Tensor::empty([0, 0], device),
                Some(g) => g.mul_scalar(self.samples as f32 / total),
                None => from_host(summed(dims[0] * dims[1], true)?, dims, device),
            });
        }
        let mut moments = Vec::with_capacity(self.moments.len());
        for (mean, _) in self.moments {
            let m = summed(mean.len(), false)?;
            let second = summed(mean.len(), false)?;
            let var = second
                .iter()
                .zip(&m)
                .map(|(s, m)| (s - m * m).max(0.0))
                .collect();
            moments.push((m, var));
        }
        // Factor rows are concatenated, not summed: rank r's rows follow rank r-1's.
        let mut factors = Vec::with_capacity(self.factors.len());
        rows.clear();
        for (k, f) in self.factors.iter().enumerate() {
            let Some(f) = f else {
                factors.push(None);
                continue;
            };
            let (inputs, outputs) = (f.inputs.dims()[1], f.output_grads.dims()[1]);
            let (mut a, mut g) = (Vec::new(), Vec::new());
            for (rank, (p, at)) in all.iter().zip(readers.iter_mut()).enumerate() {
                let rows = p[0] as usize;
                let part = p
                    .get(*at..*at + rows * (inputs + outputs))
                    .ok_or_else(|| bad(rank, "factors"))?;
                a.extend_from_slice(&part[..rows * inputs]);
                g.extend_from_slice(&part[rows * inputs..]);
                *at += rows * (inputs + outputs);
            }
            if self.factored.get(k) == Some(&Some(Factored::Weight)) {
                // This rank's rows of the batch's mean gradient: one product over every
                // rank's samples, in batch order.
                let mine = share(inputs, collective.rank(), collective.size());
                weight_rows(&a, &g, inputs, mine, total, rows);
            }
            // The bias of the same layer: its column means, over the whole batch.
            for (b, how) in self.factored.iter().enumerate() {
                if how == &Some(Factored::BiasOf(k)) {
                    grads[b] = from_host(column_means(&g, outputs, total), [1, outputs], device);
                }
            }
            factors.push(Some(GradFactors {
                inputs: from_host(a, [samples, inputs], device),
                output_grads: from_host(g, [samples, outputs], device),
            }));
        }
        Ok(StepTotal {
            samples,
            loss,
            correct,
            settle,
            grads,
            factors,
            moments,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_is_the_rank_ordered_sum_to_the_bit() {
        // Lengths around the block size, three ranks with sample-count weights.
        for len in [0, 1, 2047, 2048, 2049, 5000] {
            let parts: Vec<Vec<f32>> = (0..3)
                .map(|r| {
                    (0..len)
                        .map(|i| ((i * 7 + r * 13) % 31) as f32 * 0.37 - 5.0 + r as f32 * 1e-3)
                        .collect()
                })
                .collect();
            let views: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
            let weights = [21.0, 21.0, 22.0];
            let got = weighted_mean(&views, &weights, 64.0);
            assert_eq!(got.len(), len);
            for (i, g) in got.iter().enumerate() {
                let mut sum = 0f32;
                for (p, w) in parts.iter().zip(weights) {
                    sum += p[i] * w;
                }
                assert_eq!(g.to_bits(), (sum / 64.0).to_bits(), "element {i} of {len}");
            }
        }
    }

    #[test]
    fn split_parts_cuts_a_gather_at_the_counts() {
        let flat = [1, 2, 3, 4, 5, 6];
        assert_eq!(
            split_parts(&flat, &[2, 0, 4]),
            vec![&[1, 2][..], &[][..], &[3, 4, 5, 6][..]]
        );
        // Counts that overrun the buffer give short parts, not a panic.
        assert_eq!(
            split_parts(&flat, &[4, 4]),
            vec![&[1, 2, 3, 4][..], &[5, 6][..]]
        );
    }
}
