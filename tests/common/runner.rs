//! Running binaries built for the target under test (shared with `profiler/tests`).

use std::process::Command;

/// A command that runs `program`, a binary built for the target under test: directly, or
/// through the emulator named by `ALLOCPROF_TEST_RUNNER` (CI runs the tests built for
/// aarch64 under `qemu-aarch64`, and their children must run there too).
pub fn target_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match emulator() {
        Some(emulator) => {
            let mut c = Command::new(emulator);
            c.arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The emulator the tests run under, if any.
fn emulator() -> Option<std::ffi::OsString> {
    std::env::var_os("ALLOCPROF_TEST_RUNNER").filter(|r| !r.is_empty())
}

/// Whether the tests run under an emulator (then everything runs 10–50 times slower).
pub fn emulated() -> bool {
    emulator().is_some()
}
