//! Child processes: the tool re-executes itself in a role.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::report::Sample;

/// A child process whose stdout is read line by line.
pub struct Proc {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Proc {
    /// Spawns this executable with `args`.
    ///
    /// # Panics
    ///
    /// If the executable cannot be spawned.
    pub fn spawn(args: &[String]) -> Self {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a benchmark process");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, out }
    }

    /// Reads lines until one starts with `prefix`; returns it.
    ///
    /// # Panics
    ///
    /// If the child exits first.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).expect("read child output");
            assert!(n > 0, "benchmark child exited before printing {prefix:?}");
            if line.starts_with(prefix) {
                return line.trim_end().to_owned();
            }
        }
    }

    /// Waits for the child's `RESULT` line and its exit.
    ///
    /// # Panics
    ///
    /// If the child fails or prints no result.
    pub fn result(mut self) -> Sample {
        let line = self.expect_line("RESULT ");
        let status = self.child.wait().expect("wait for child");
        assert!(status.success(), "benchmark child failed: {status}");
        Sample::parse(&line).expect("well-formed RESULT line")
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pins the calling thread to `cpu`; returns the previous affinity, to
/// restore with [`restore`].
pub fn pin(cpu: usize) -> Option<rustix::thread::CpuSet> {
    let old = rustix::thread::sched_getaffinity(None).ok();
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
    old
}

/// Lets the calling thread run on every CPU again.
pub fn unpin() {
    let mut set = rustix::thread::CpuSet::new();
    for cpu in 0..std::thread::available_parallelism().map_or(1, |n| n.get()).max(64) {
        set.set(cpu);
    }
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// Restores an affinity saved by [`pin`].
pub fn restore(old: Option<rustix::thread::CpuSet>) {
    if let Some(set) = old {
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }
}
