//! The machine's physical limits, measured between two processes:
//! cache-line ping-pong (the floor of any spinning round trip), futex and
//! pipe ping-pong (the floors of a sleeping one), and single-thread memcpy
//! bandwidth (the floor of any bulk transfer).
//!
//! The shared-memory ping-pong is also used step by step by the `wake`
//! bench (`benches/benches/wake.rs`): [`ping`] is one round trip of the
//! parent, [`pong`] one echo of the peer.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use coroipc_transport::futex;
use coroipc_transport::segment::Segment;

use crate::proc::Proc;
use crate::report::{histogram, now_ns, Sample};

/// Offset of the parent's word in the shared page.
pub const PING: usize = 0;
/// Offset of the peer's word: two cache lines after [`PING`] (128 bytes,
/// so the adjacent-line prefetcher does not pair them).
pub const PONG: usize = 128;
/// Size of the shared page holding both words.
pub const PAGE: usize = 4096;

/// Which ping-pong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Both sides spin on shared cache lines.
    Spin,
    /// Both sides sleep on shared futexes.
    Futex,
    /// Both sides sleep in `read(2)` on pipes.
    Pipe,
}

impl Kind {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Spin => "spin",
            Self::Futex => "futex",
            Self::Pipe => "pipe",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Spin, Self::Futex, Self::Pipe].into_iter().find(|k| k.name() == s)
    }
}

/// Opens the parent's descriptor `fd` (the peer is our child: same user,
/// so `/proc/<ppid>/fd` is open to it). Avoids inheriting descriptors.
fn open_parent_fd(fd: i32, read: bool, write: bool) -> File {
    let ppid = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    OpenOptions::new()
        .read(read)
        .write(write)
        .open(format!("/proc/{ppid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("open parent fd {fd}: {e}"))
}

/// Runs `count` round trips of `kind` against a peer process; returns the
/// latency sample.
pub fn ping_pong(kind: Kind, count: u64, cpu: Option<usize>) -> Sample {
    let saved = cpu.map(crate::proc::pin);
    let pin_args: Vec<String> = cpu.map(|c| vec!["--cpu".into(), c.to_string()]).unwrap_or_default();
    let sample = ping_pong_inner(kind, count, &pin_args);
    if let Some(old) = saved {
        crate::proc::restore(old);
    }
    sample
}

fn ping_pong_inner(kind: Kind, count: u64, pin_args: &[String]) -> Sample {
    let warmup = (count / 10).clamp(100, 10_000);
    match kind {
        Kind::Spin | Kind::Futex => {
            let seg = Segment::create(PAGE).expect("shared page");
            let mut peer = Proc::spawn(
                &[
                    &[
                        "--role".into(),
                        "floor-peer".into(),
                        "--floor-kind".into(),
                        kind.name().into(),
                        "--fds".into(),
                        std::os::fd::AsFd::as_fd(&seg).as_raw_fd().to_string(),
                        "--count".into(),
                        (count + warmup).to_string(),
                    ][..],
                    pin_args,
                ]
                .concat(),
            );
            peer.expect_line("READY");
            let (ping_word, pong_word) = (seg.atomic_u32(PING), seg.atomic_u32(PONG));
            let mut hist = histogram();
            let mut start = now_ns();
            for seq in 1..=count + warmup {
                if seq == warmup + 1 {
                    start = now_ns();
                }
                let t0 = Instant::now();
                ping(kind, ping_word, pong_word, seq as u32);
                if seq > warmup {
                    hist.record(t0.elapsed().as_nanos() as u64).expect("in range");
                }
            }
            let end = now_ns();
            peer.result();
            Sample::new(Some(&hist), count, 0, start, end)
        }
        Kind::Pipe => {
            let (to_peer_r, to_peer_w): (OwnedFd, OwnedFd) = rustix::pipe::pipe().expect("pipe");
            let (from_peer_r, from_peer_w): (OwnedFd, OwnedFd) = rustix::pipe::pipe().expect("pipe");
            let mut peer = Proc::spawn(
                &[
                    &[
                        "--role".into(),
                        "floor-peer".into(),
                        "--floor-kind".into(),
                        "pipe".into(),
                        "--fds".into(),
                        format!("{},{}", to_peer_r.as_raw_fd(), from_peer_w.as_raw_fd()),
                        "--count".into(),
                        (count + warmup).to_string(),
                    ][..],
                    pin_args,
                ]
                .concat(),
            );
            peer.expect_line("READY");
            drop((to_peer_r, from_peer_w));
            let mut tx = File::from(to_peer_w);
            let mut rx = File::from(from_peer_r);
            let mut hist = histogram();
            let mut start = now_ns();
            let mut b = [0u8; 8];
            for seq in 1..=count + warmup {
                if seq == warmup + 1 {
                    start = now_ns();
                }
                let t0 = Instant::now();
                tx.write_all(&seq.to_le_bytes()).expect("pipe write");
                rx.read_exact(&mut b).expect("pipe read");
                assert_eq!(u64::from_le_bytes(b), seq, "pipe floor: sequence");
                if seq > warmup {
                    hist.record(t0.elapsed().as_nanos() as u64).expect("in range");
                }
            }
            let end = now_ns();
            drop(tx);
            peer.result();
            Sample::new(Some(&hist), count, 0, start, end)
        }
    }
}

/// One round trip of the shared-memory ping-pong, parent side: publishes
/// `seq` on `ping_word` (and wakes the peer for [`Kind::Futex`]), then
/// waits until the peer echoed it on `pong_word` (spinning for
/// [`Kind::Spin`], sleeping on the futex otherwise).
#[inline]
pub fn ping(kind: Kind, ping_word: &AtomicU32, pong_word: &AtomicU32, seq: u32) {
    ping_word.store(seq, Ordering::Release);
    if kind == Kind::Futex {
        futex::wake_all(ping_word);
    }
    wait_for(pong_word, seq, kind);
}

/// One echo of the shared-memory ping-pong, peer side: waits until
/// `ping_word` holds a value other than `last`, echoes it on `pong_word`
/// (waking the parent for [`Kind::Futex`]) and returns it. While it waits
/// it asks `gone` now and then (every 2^20 spins, or every futex wake-up
/// or 100 ms sleep) whether the parent went away; `None` if so.
#[inline]
pub fn pong(
    kind: Kind,
    ping_word: &AtomicU32,
    pong_word: &AtomicU32,
    last: u32,
    mut gone: impl FnMut() -> bool,
) -> Option<u32> {
    let mut idle = 0u32;
    loop {
        let v = ping_word.load(Ordering::Acquire);
        if v != last {
            pong_word.store(v, Ordering::Release);
            if kind == Kind::Futex {
                futex::wake_all(pong_word);
            }
            return Some(v);
        }
        match kind {
            Kind::Spin => {
                std::hint::spin_loop();
                idle = idle.wrapping_add(1);
                if idle.is_multiple_of(1 << 20) && gone() {
                    return None;
                }
            }
            _ => {
                if futex::wait(ping_word, last, Some(Duration::from_millis(100))).is_err() && gone() {
                    return None;
                }
            }
        }
    }
}

fn wait_for(word: &AtomicU32, value: u32, kind: Kind) {
    loop {
        let now = word.load(Ordering::Acquire);
        if now == value {
            return;
        }
        match kind {
            Kind::Spin => std::hint::spin_loop(),
            _ => {
                let _ = futex::wait(word, now, Some(Duration::from_millis(100)));
            }
        }
    }
}

/// The peer side of [`ping_pong`] (runs in the child process).
pub fn peer(kind: Kind, fds: &str, count: u64) {
    let fds: Vec<i32> = fds.split(',').map(|s| s.parse().expect("fd number")).collect();
    match kind {
        Kind::Spin | Kind::Futex => {
            let file = open_parent_fd(fds[0], true, true);
            let seg = Segment::from_fd(OwnedFd::from(file), PAGE as u64).expect("sealed shared page");
            let (ping_word, pong_word) = (seg.atomic_u32(PING), seg.atomic_u32(PONG));
            println!("READY");
            let mut last = 0;
            for seq in 1..=count {
                // The parent outlives its count; nothing to watch for.
                last = pong(kind, ping_word, pong_word, last, || false).expect("the parent stays");
                assert_eq!(u64::from(last), seq, "spin/futex floor: sequence");
            }
        }
        Kind::Pipe => {
            let mut rx = open_parent_fd(fds[0], true, false);
            let mut tx = open_parent_fd(fds[1], false, true);
            println!("READY");
            let mut b = [0u8; 8];
            for _ in 0..count {
                rx.read_exact(&mut b).expect("pipe read");
                tx.write_all(&b).expect("pipe write");
            }
        }
    }
    println!("{}", Sample::default().to_line());
}

/// Single-thread memcpy bandwidth copying `chunk`-byte pieces through a
/// 4 MiB span — the working set of a transfer through the transports' rings
/// and socket buffers (a 64 MiB span would measure DRAM instead, slower
/// than what either transport moves through the cache).
pub fn memcpy(chunk: usize, total: u64) -> Sample {
    let span = (4usize << 20).max(chunk * 4);
    let src = vec![1u8; span];
    let mut dst = vec![0u8; span];
    let pieces = span / chunk;
    let ops = (total / chunk as u64).max(1);
    let start = now_ns();
    for i in 0..ops as usize {
        let at = (i % pieces) * chunk;
        dst[at..at + chunk].copy_from_slice(&src[at..at + chunk]);
        std::hint::black_box(&mut dst);
    }
    let end = now_ns();
    Sample::new(None, ops, ops * chunk as u64, start, end)
}
