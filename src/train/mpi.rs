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

use super::parallel::{Collective, CommStats, ParallelError};

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

    fn gather<T: Equivalence + Copy + Default>(
        &self,
        local: &[T],
    ) -> Result<Vec<Vec<T>>, ParallelError> {
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
        let mut buf = vec![T::default(); total];
        {
            let mut partition = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(local, &mut partition);
        }
        let mut out = Vec::with_capacity(size);
        for (&c, &d) in counts.iter().zip(&displs) {
            out.push(buf[d as usize..(d + c) as usize].to_vec());
        }
        let item = std::mem::size_of::<T>() as u64;
        let mut s = self.stats.get();
        s.calls += 2;
        s.bytes_sent += (local.len() as u64 + 1) * item;
        s.bytes_received += (total - local.len()) as u64 * item + (size as u64 - 1) * 4;
        s.seconds += start.elapsed().as_secs_f64();
        s.waiting += waited;
        self.stats.set(s);
        Ok(out)
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, ParallelError> {
        self.gather(local)
    }

    fn all_gather_u64(&self, local: &[u64]) -> Result<Vec<Vec<u64>>, ParallelError> {
        self.gather(local)
    }

    fn stats(&self) -> CommStats {
        self.stats.get()
    }
}
