//! Temporary files and directories that remove themselves (shared with
//! `http-endpoint/tests`), so that a test run leaves nothing behind in the temp directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A path in the system's temp directory, unique to one call in this process, removed
/// (a file, or a directory with its contents) when the value is dropped: at the end of
/// the test that holds it, also when an assertion fails and the test unwinds.
///
/// Uniqueness comes from the process id and a process-wide counter, so that tests running
/// on parallel threads of one test binary never share, nor remove, each other's paths.
#[derive(Debug)]
pub struct TempPath(PathBuf);

impl TempPath {
    /// `<temp dir>/<prefix>-<pid>-<n><suffix>`, not yet created.
    pub fn new(prefix: &str, suffix: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}{suffix}", std::process::id());
        TempPath(std::env::temp_dir().join(name))
    }

    /// `<temp dir>/<prefix>-<pid>-<n>`, created as an empty directory.
    pub fn dir(prefix: &str) -> Self {
        let dir = TempPath::new(prefix, "");
        std::fs::create_dir_all(&dir.0).expect("create temp dir");
        dir
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        // Best effort, and never a panic here (it may run while a failed test unwinds).
        let _ = match std::fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&self.0),
            Ok(_) => std::fs::remove_file(&self.0),
            Err(_) => Ok(()),
        };
    }
}
