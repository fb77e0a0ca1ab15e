//! [`Collective`] over MPI (the `mpi` cargo feature, rsmpi): one process per rank, started
//! by `mpirun`. MPI's default error handler is fatal, so a transport failure ends the job;
//! a rank that dies makes `mpirun` stop the others.

use std::cell::Cell;
use std::time::Instant;

use mpi::Count;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Equivalence};

use super::parallel::{Collective, CommStats, ParallelError, split_parts};

/// The world communicator of an MPI job. Dropping it finalises MPI.
pub struct MpiCollective {
    // Field order: the communicator goes before the universe that finalises MPI.
    world: SimpleCommunicator,
    _universe: Universe,
    stats: Cell<CommStats>,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiCollective(rank {} of {})", self.rank(), self.size())
    }
}

/// Whether this process was started by an MPI launcher (`mpirun`, `srun`): the
/// environment variables Open MPI, PMIx, MPICH/Hydra and Slurm's PMI set.
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

impl MpiCollective {
    /// Initialises MPI (once per process; `None` if it already was).
    pub fn init() -> Option<Self> {
        let universe = mpi::initialize()?;
        Some(Self {
            world: universe.world(),
            _universe: universe,
            stats: Cell::new(CommStats::default()),
        })
    }

    /// Ends the whole job with `code` (every rank), after a rank's unrecoverable error, so
    /// that no rank waits forever in a collective the failed one will never join.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Every rank's `local`, concatenated in rank order into `out` (its allocation reused:
    /// a step's gather then costs no fresh pages); returns each rank's length.
    fn gather_into<T: Equivalence + Copy + Default>(
        &self,
        local: &[T],
        out: &mut Vec<T>,
    ) -> Result<Vec<usize>, ParallelError> {
        let start = Instant::now();
        let size = self.size();
        let len = Count::try_from(local.len()).map_err(|_| {
            ParallelError::Transport(format!("{} values in one gather", local.len()))
        })?;
        let mut counts = vec![0 as Count; size];
        self.world.all_gather_into(&len, &mut counts[..]);
        let waited = start.elapsed().as_secs_f64();
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |acc, &c| {
                let at = *acc;
                *acc += c;
                Some(at)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        // Every value is overwritten by the gather: only new length is initialised.
        out.resize(total, T::default());
        {
            let mut partition = PartitionMut::new(&mut out[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(local, &mut partition);
        }
        let item = std::mem::size_of::<T>() as u64;
        let mut s = self.stats.get();
        s.calls += 2;
        s.bytes_sent += (local.len() as u64 + 1) * item;
        s.bytes_received += (total - local.len()) as u64 * item + (size as u64 - 1) * 4;
        s.seconds += start.elapsed().as_secs_f64();
        s.waiting += waited;
        self.stats.set(s);
        Ok(counts.into_iter().map(|c| c as usize).collect())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_gather_f32_into(
        &self,
        local: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<Vec<usize>, ParallelError> {
        self.gather_into(local, out)
    }

    fn all_gather_u64(&self, local: &[u64]) -> Result<Vec<Vec<u64>>, ParallelError> {
        let mut out = Vec::new();
        let counts = self.gather_into(local, &mut out)?;
        Ok(split_parts(&out, &counts)
            .into_iter()
            .map(<[u64]>::to_vec)
            .collect())
    }

    fn stats(&self) -> CommStats {
        self.stats.get()
    }
}
