//! The `mep` command-line tool.

mod cli;

use std::process::ExitCode;

/// Counts live heap bytes for `mep bench memory` (two relaxed atomics per allocation).
#[global_allocator]
static ALLOCATOR: mep::bench::CountingAllocator = mep::bench::CountingAllocator;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so a write to a closed pipe (`mep train --json | head -1`)
    // would be an error at every print; the default action ends the process quietly, as
    // other Unix tools do.
    #[cfg(unix)]
    // SAFETY: called first in main, before any thread exists; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    mep::device::tune_allocator();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
