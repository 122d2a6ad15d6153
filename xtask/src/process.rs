//! Child processes that cannot outlive the run that started them.

use std::io;
use std::process::{Child, ExitStatus};

/// An emulator process that is killed (and reaped) when dropped.
///
/// Every way out of a run — success, timeout, an early `?`, a panic in a
/// test — drops the guard, so no QEMU or Bochs is ever left spinning on the
/// host's two cores.
#[derive(Debug)]
pub struct KillOnDrop {
    child: Child,
}

impl KillOnDrop {
    /// Takes ownership of a freshly spawned child.
    pub fn new(child: Child) -> Self {
        Self { child }
    }

    /// The child's exit status if it has ended, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills the child now and waits for it; harmless if it already ended.
    pub fn kill(&mut self) {
        // Both fail only when the child already ended and was reaped, which
        // is exactly the state we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
