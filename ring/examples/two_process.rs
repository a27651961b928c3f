//! Two processes, one shared mapping, two rings: the parent sends 64-byte
//! requests carrying a sequence number, the child echoes each one back.
//!
//! ```text
//! cargo run --release -p coroipc-ring --example two_process [-- COUNT]
//! ```
//!
//! The mapping is a memfd inherited by the child (re-exec of this binary);
//! both sides busy-poll (waking through futexes is `coroipc-transport`'s
//! job). Prints the median and p99 round trip.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use coroipc_ring::{init, required_size, Consumer, PopError, Producer, Region, RingConfig};
use memmap2::MmapRaw;

const CAPACITY: u64 = 64 * 1024;
const MSG: usize = 64 - 8; // 64 bytes a record including its header

struct Shared(MmapRaw);

// SAFETY: a shared mapping of a file that neither side truncates, unmapped
// only when this value drops; mmap returns page-aligned addresses.
unsafe impl Region for Shared {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

fn ring_span() -> usize {
    required_size(CAPACITY)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(&args[2]);
    }
    let count: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);

    // A memfd without CLOEXEC, so the child inherits it.
    let fd =
        rustix::fs::memfd_create("coroipc-example", rustix::fs::MemfdFlags::empty()).expect("memfd_create");
    let file = std::fs::File::from(fd);
    file.set_len(2 * ring_span() as u64).expect("size the memfd");
    let region: Arc<dyn Region> = Arc::new(Shared(MmapRaw::map_raw(&file).expect("mmap")));
    let config = RingConfig::new(CAPACITY);
    init(&region, 0, ring_span(), &config).expect("init request ring");
    init(&region, ring_span(), ring_span(), &config).expect("init response ring");
    let mut requests = Producer::attach(region.clone(), 0, ring_span()).expect("attach");
    let mut responses = Consumer::attach(region.clone(), ring_span(), ring_span()).expect("attach");

    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(["child", &path])
        .spawn()
        .expect("spawn the echo process");

    let mut rtts = Vec::with_capacity(count as usize);
    let mut msg = [0u8; MSG];
    let mut back = [0u8; MSG];
    for seq in 0..count {
        msg[..8].copy_from_slice(&seq.to_le_bytes());
        let t0 = Instant::now();
        while requests.try_push(&msg).is_err() {
            std::hint::spin_loop();
        }
        loop {
            match responses.try_pop(&mut back) {
                Ok(n) => {
                    assert_eq!(n, MSG);
                    assert_eq!(back[..8], seq.to_le_bytes(), "echo carries the sequence number");
                    break;
                }
                Err(PopError::Empty) => std::hint::spin_loop(),
                Err(e) => panic!("response ring: {e}"),
            }
        }
        rtts.push(t0.elapsed().as_nanos() as u64);
    }
    // A zero-length record tells the child to stop.
    while requests.try_push(&[]).is_err() {
        std::hint::spin_loop();
    }
    assert!(child.wait().expect("wait for child").success(), "child failed");
    rtts.sort_unstable();
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize];
    println!(
        "{count} round trips of {} B between two processes over one memfd: median {} ns, p99 {} ns",
        MSG + 8,
        pct(0.5),
        pct(0.99)
    );
}

fn child(path: &str) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open inherited memfd");
    let region: Arc<dyn Region> = Arc::new(Shared(MmapRaw::map_raw(&file).expect("mmap")));
    let mut requests = Consumer::attach(region.clone(), 0, ring_span()).expect("attach");
    let mut responses = Producer::attach(region.clone(), ring_span(), ring_span()).expect("attach");
    let mut buf = [0u8; MSG];
    loop {
        match requests.try_pop(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                while responses.try_push(&buf[..n]).is_err() {
                    std::hint::spin_loop();
                }
            }
            Err(PopError::Empty) => std::hint::spin_loop(),
            Err(e) => panic!("request ring: {e}"),
        }
    }
}
