//! The scale sweep: how the cost of a round trip and of fan-in grows with
//! the number of connections.
//!
//! * `rr64` with 0, 100, 1,000, 3,000 and 10,000 idle connections open on the same
//!   server (held by a separate process, each with the smallest rings), and
//!   the server's resident memory and descriptors per idle connection;
//! * `fanin` (`rr64` from every client at once) with 1, 4, 16, 64 and 256
//!   client processes: total round trips per second.
//!
//! Idle connections are opened by an `idle` child process; the tool raises
//! its own descriptor limit (inherited by its children) so that 10,000
//! connections fit on both sides.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use coroipc_client::{Client, Sizes};

use crate::workload::SERVICE;

/// Idle-connection counts of the sweep.
pub const IDLE: [usize; 5] = [0, 100, 1_000, 3_000, 10_000];
/// Client counts of the fan-in sweep.
pub const CLIENTS: [usize; 5] = [1, 4, 16, 64, 256];

/// The smallest rings a connection can have: what an idle connection costs
/// at least.
pub fn idle_sizes() -> Sizes {
    let min = coroipc_transport::handshake::MIN_RING_BYTES;
    Sizes {
        request_ring_bytes: min,
        response_ring_bytes: min,
        dispatch_ring_bytes: min,
        max_message_bytes: 1024,
    }
}

/// Opens `n` idle coroipc connections to `endpoint`.
///
/// # Panics
///
/// If a connect fails.
pub fn idle_coroipc(endpoint: &str, n: usize) -> Vec<Client> {
    (0..n)
        .map(|i| {
            Client::builder(endpoint, SERVICE)
                .sizes(idle_sizes())
                .timeout(Duration::from_secs(10))
                .connect()
                .unwrap_or_else(|e| panic!("idle connection {i} of {n}: {e}"))
        })
        .collect()
}

/// Opens `n` idle Unix-socket connections to `path`.
///
/// # Panics
///
/// If a connect fails.
pub fn idle_uds(path: &str, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|i| UnixStream::connect(path).unwrap_or_else(|e| panic!("idle connection {i} of {n}: {e}")))
        .collect()
}

/// Raises this process's descriptor limit (soft and, if allowed, hard) to
/// at least `want`; returns the soft limit in force afterwards. Children
/// inherit it.
pub fn raise_fd_limit(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= want {
        return current;
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE; without it, go as far
    // as the hard limit allows.
    if setrlimit(
        Resource::Nofile,
        Rlimit { current: Some(want), maximum: Some(want.max(now.maximum.unwrap_or(0))) },
    )
    .is_err()
    {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: now.maximum, maximum: now.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Most idle connections one holder process opens (a client connection
/// holds up to 8 descriptors: socket, segment, eventfds, its poll set).
pub const IDLE_PER_PROCESS: usize = 1_500;

/// How `idle` connections are split over holder processes.
pub fn shares(idle: usize) -> Vec<usize> {
    let n = idle.div_ceil(IDLE_PER_PROCESS);
    (0..n).map(|i| IDLE_PER_PROCESS.min(idle - i * IDLE_PER_PROCESS)).collect()
}

/// Descriptors the server needs for `idle` connections plus `clients`
/// active ones (five per connection, see `ServerBuilder::max_connections`),
/// with room to spare; a holder process needs at most
/// `fds_for(IDLE_PER_PROCESS, 0)` with eight per connection, which is less.
pub fn fds_for(idle: usize, clients: usize) -> u64 {
    (((idle + clients) as u64) * 5 + 1024).max(IDLE_PER_PROCESS as u64 * 8 + 1024)
}

/// A process's resident set and open descriptors, from `/proc`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Resident memory, KiB (`VmRSS`: private and shared pages it touched).
    pub rss_kib: u64,
    /// Open descriptors.
    pub fds: u64,
}

impl Footprint {
    /// Reads process `pid`'s footprint (zeros if `/proc` cannot tell).
    pub fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        Self { rss_kib, fds }
    }

    /// Reads process `pid`'s footprint once it has settled: the descriptor
    /// count unchanged over three reads 20 ms apart (a server may still be
    /// accepting connections its clients already count as made), at most
    /// `within`.
    pub fn settled(pid: u32, within: Duration) -> Self {
        let end = std::time::Instant::now() + within;
        let mut last = Self::of(pid);
        let mut same = 0;
        while same < 3 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            let now = Self::of(pid);
            same = if now.fds == last.fds { same + 1 } else { 0 };
            last = now;
        }
        last
    }

    /// What `n` connections added, per connection, from `before` to `self`:
    /// `(KiB, descriptors)`.
    pub fn per_connection(self, before: Self, n: usize) -> (f64, f64) {
        if n == 0 {
            return (0.0, 0.0);
        }
        let n = n as f64;
        (
            self.rss_kib.saturating_sub(before.rss_kib) as f64 / n,
            self.fds.saturating_sub(before.fds) as f64 / n,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_reads_this_process_and_counts_new_descriptors() {
        let before = Footprint::of(std::process::id());
        assert!(before.rss_kib > 0 && before.fds > 0, "{before:?}");
        let files: Vec<_> =
            (0..10).map(|_| std::fs::File::open("/proc/self/status").expect("open")).collect();
        let after = Footprint::of(std::process::id());
        let (_, fds) = after.per_connection(before, files.len());
        assert!(fds > 0.5, "ten more descriptors open: {fds} per file");
        assert_eq!(after.per_connection(before, 0), (0.0, 0.0));
    }

    #[test]
    fn idle_connections_are_split_into_full_shares_and_a_rest() {
        assert_eq!(shares(0), Vec::<usize>::new());
        assert_eq!(shares(100), vec![100]);
        assert_eq!(shares(3_000), vec![1_500, 1_500]);
        assert_eq!(shares(3_001), vec![1_500, 1_500, 1]);
        assert_eq!(shares(10_000).iter().sum::<usize>(), 10_000);
    }
}
