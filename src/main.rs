//! The `mep` command-line tool.

mod cli;

use std::process::ExitCode;

/// Counts live heap bytes for `mep bench memory` (two relaxed atomics per allocation).
#[global_allocator]
static ALLOCATOR: mep::bench::CountingAllocator = mep::bench::CountingAllocator;

fn main() -> ExitCode {
    mep::device::tune_allocator();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
