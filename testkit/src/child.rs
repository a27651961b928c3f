//! Child test processes speaking marker lines.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A child process running one of this test binary's helpers.
#[derive(Debug)]
pub struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    what: String,
    /// Free for the caller: e.g. the text of the child's ready line.
    pub ready: String,
}

/// Spawns this test binary's `#[ignore]` helper test `helper` (its full
/// path, e.g. `test_server_process`, or `module::helper` for one in a module) with `envs`.
///
/// # Panics
///
/// If the process cannot be spawned.
pub fn spawn(helper: &str, envs: &[(&str, String)]) -> ChildProc {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--ignored", "--exact", helper, "--nocapture", "--test-threads=1"])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut what = helper.to_string();
    for (k, v) in envs {
        cmd.env(k, v);
        if k.ends_with("ROLE") || k.ends_with("MODE") {
            what = format!("{helper}[{v}]");
        }
    }
    let mut child = cmd.spawn().expect("spawn a child test process");
    let stdout = child.stdout.take().expect("piped stdout");
    let stdin = child.stdin.take();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print "test name ... " on the same line first.
            if let Some(at) = line.find("@@") {
                if tx.send(line[at + 2..].to_string()).is_err() {
                    break;
                }
            }
        }
    });
    ChildProc { child, stdin, lines: rx, seen: Vec::new(), what, ready: String::new() }
}

impl ChildProc {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line `@@<marker> …` (taking one that arrived earlier
    /// first); returns what follows the marker.
    ///
    /// # Panics
    ///
    /// If none comes within `timeout` or the child's stdout closes.
    pub fn expect(&mut self, marker: &str, timeout: Duration) -> String {
        let matches = |line: &str| {
            line.strip_prefix(marker)
                .filter(|rest| rest.is_empty() || rest.starts_with(' '))
                .map(|rest| rest.trim().to_string())
        };
        if let Some(i) = self.seen.iter().position(|l| matches(l).is_some()) {
            let line = self.seen.remove(i);
            return matches(&line).expect("matched above");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match matches(&line) {
                    Some(rest) => return rest,
                    None => self.seen.push(line),
                },
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{} {}: no @@{marker} within {timeout:?}; saw {:?}",
                        self.what,
                        self.pid(),
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{} {}: stdout closed before @@{marker} (status {:?}); saw {:?}",
                    self.what,
                    self.pid(),
                    self.child.try_wait(),
                    self.seen
                ),
            }
        }
    }

    /// Waits for a `@@<marker>` line whose `key` field is `value`; other
    /// `@@<marker>` lines are kept for later.
    ///
    /// # Panics
    ///
    /// As [`expect`](Self::expect).
    pub fn expect_with(&mut self, marker: &str, key: &str, value: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no @@{marker} with {key}={value} within {timeout:?}; saw {others:?}");
            let line = self.expect(marker, left);
            if field_opt(&line, key) == Some(value) {
                break line;
            }
            others.push(format!("{marker} {line}"));
        };
        self.seen.extend(others);
        found
    }

    /// Takes every `@@<marker>` line with `key=value` that arrived so far.
    pub fn take_all(&mut self, marker: &str, key: &str, value: &str) -> Vec<String> {
        self.drain();
        let mut taken = Vec::new();
        self.seen.retain(|l| match l.strip_prefix(marker) {
            Some(rest) if rest.starts_with(' ') && field_opt(rest, key) == Some(value) => {
                taken.push(rest.trim().to_string());
                false
            }
            _ => true,
        });
        taken
    }

    /// Whether a `@@<marker>` line with `key=value` arrived by now.
    pub fn saw(&mut self, marker: &str, key: &str, value: &str) -> bool {
        self.drain();
        self.seen.iter().any(|l| {
            l.strip_prefix(marker)
                .is_some_and(|rest| rest.starts_with(' ') && field_opt(rest, key) == Some(value))
        })
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Marker lines received so far that no [`expect`](Self::expect) took.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Sends a line to the child's stdin.
    ///
    /// # Panics
    ///
    /// If stdin is closed.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Sends a control command and returns the text of its `@@<reply>`.
    ///
    /// # Panics
    ///
    /// As [`expect`](Self::expect).
    pub fn command(&mut self, line: &str, reply: &str) -> String {
        self.send_line(line);
        self.expect(reply, Duration::from_secs(10))
    }

    /// Whether the child has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends SIGKILL; returns the instant just before the signal.
    pub fn kill(&mut self) -> Instant {
        let at = Instant::now();
        let _ = self.child.kill();
        at
    }

    /// Waits for the child to exit.
    ///
    /// # Panics
    ///
    /// If it does not exit within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} {} did not exit within {timeout:?}",
                self.what,
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` out of a marker line's text, if present.
pub fn field_opt<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `key=value` out of a marker line's text.
///
/// # Panics
///
/// If there is no such field.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    field_opt(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// A numeric `key=value` out of a marker line's text.
///
/// # Panics
///
/// If there is no such field or it is not a number.
pub fn num(line: &str, key: &str) -> u64 {
    field(line, key).parse().unwrap_or_else(|_| panic!("{key} is not a number in {line:?}"))
}

/// Prints a marker line `@@<marker> <text>` (flushed at once).
pub fn report(marker: &str, text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "@@{marker} {text}");
    let _ = out.flush();
}
