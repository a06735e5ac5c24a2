//! The binary's edge: parse arguments, run, map failures to exit codes.

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the relay allocates and frees a few
/// dozen small buffers per event (rows, envelopes, librdkafka headers), and
/// glibc's allocator took 31% of its instructions per event under callgrind
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    outbox_relay::cli::main()
}
