//! The binary's edge: parse arguments, run, map failures to exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    outbox_relay::cli::main()
}
