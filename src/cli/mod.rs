//! Command-line interface: argument parsing and the subcommands.

/// `println!` that returns an error (a full disk, a closed descriptor) instead of panicking.
/// A closed pipe never gets here: `main` restores the default SIGPIPE action, so `mep ...
/// | head` ends quietly as other Unix tools do.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("writing to standard output: {e}"))
    }};
}

/// `print!` with [`outln!`]'s error handling.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("writing to standard output: {e}"))
    }};
}

/// `eprintln!` for progress and summaries: a closed or full stderr loses the line instead
/// of ending the run.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!` with [`errln!`]'s error handling.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod bench;
mod check;
mod continual;
mod data;
mod memory;
mod progress;
mod suites;
mod train;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mep::device::{self, DeviceChoice};

/// Equilibrium Propagation with geometry-aware optimizers.
#[derive(Debug, Parser)]
#[command(name = "mep", version, about, long_about = None)]
pub struct Cli {
    /// Seed for initialisation, shuffling and permutations (default 42; a resumed run
    /// keeps its own).
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// Device: cpu (fastest CPU backend for the job), cpu:flex, cpu:ndarray, cuda, cuda:N.
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceChoice,
    /// Worker threads for CPU kernels (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// Directory of data sets, searched before $MEP_DATA_DIR and the user cache.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List and fetch data sets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a model with backprop, EP, local EP or EqProp.
    Train(Box<train::TrainArgs>),
    /// Test accuracy of a training checkpoint.
    Eval(train::EvalArgs),
    /// Compare an EP gradient with the backprop gradient of the same loss.
    CheckGradient(check::CheckArgs),
    /// Continual learning on permuted MNIST: tasks in turn, one model and optimizer, the
    /// accuracy matrix, forgetting and backward transfer; optional EWC.
    Continual(Box<continual::ContinualArgs>),
    /// Benchmark suites.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Settings every subcommand shares.
pub struct Globals {
    /// The ranks of a data-parallel run under `mpirun` (the `mpi` feature), else `None`.
    pub collective: Option<std::rc::Rc<dyn mep::train::parallel::Collective>>,
    /// Worker threads asked for (0: one per core).
    pub threads: usize,
    /// Seed.
    pub seed: u64,
    /// The seed given on the command line, if any.
    pub seed_given: Option<u64>,
    /// Device choice.
    pub device: DeviceChoice,
    /// Explicit data directory.
    pub data_dir: Option<PathBuf>,
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    device::set_threads(cli.threads).context("setting up worker threads")?;
    // A misspelt MEP_SIMD would otherwise silently run at the CPU's level.
    mep::simd::level_from_env().map_err(anyhow::Error::msg)?;
    #[cfg(feature = "mpi")]
    let mpi = mep::train::mpi::launched_by_mpirun()
        .then(mep::train::mpi::MpiCollective::init)
        .flatten()
        .map(std::rc::Rc::new)
        .filter(|c| mep::train::parallel::Collective::size(c.as_ref()) > 1);
    #[cfg(feature = "mpi")]
    let collective = mpi
        .clone()
        .map(|c| c as std::rc::Rc<dyn mep::train::parallel::Collective>);
    #[cfg(not(feature = "mpi"))]
    let collective = None;
    let globals = Globals {
        collective,
        threads: cli.threads,
        seed: cli.seed.unwrap_or(mep::experiment::DEFAULT_SEED),
        seed_given: cli.seed,
        device: cli.device,
        data_dir: cli.data_dir,
    };
    if globals.collective.is_some() && !matches!(cli.command, Command::Train(_)) {
        anyhow::bail!("only `mep train` runs data-parallel under mpirun; run other commands alone");
    }
    let result = match cli.command {
        Command::Data(cmd) => data::run(cmd, &globals),
        Command::Train(args) => train::run(*args, &globals),
        Command::Eval(args) => train::eval(args, &globals),
        Command::CheckGradient(args) => check::run(args, &globals),
        Command::Continual(args) => continual::run(*args, &globals),
        Command::Bench(cmd) => bench::run(cmd, &globals),
    };
    // A rank that fails alone would leave the others waiting in their next collective:
    // report, then end the whole job.
    #[cfg(feature = "mpi")]
    if let (Err(e), Some(mpi)) = (&result, &mpi) {
        use mep::train::parallel::Collective as _;
        errln!("error on rank {} of {}: {e:#}", mpi.rank(), mpi.size());
        mpi.abort(1);
    }
    result
}
