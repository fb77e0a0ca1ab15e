//! The `mep` command-line tool.

mod cli;

use std::process::ExitCode;

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
