//! Cross-process criterion benches: `rr64`, `ev64` and `rr1m` (the
//! workloads of `benches/README.md`) over coroipc and over Unix domain sockets, the server in a child
//! process (this bench binary re-executed with `--role server`), so
//! regressions show in criterion's reports.
//!
//! ```text
//! cargo bench -p coroipc-benches --bench ipc
//! ```
// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::io::IoSlice;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use coroipc_benches::proc::Proc;
use coroipc_benches::workload::{cmd, HEADER, SERVICE};
use coroipc_benches::{rpc, uds};
use coroipc_client::{Client, Sizes};
use criterion::{criterion_group, Criterion, Throughput};

fn server(transport: &str) -> (Proc, String) {
    let endpoint = match transport {
        "coroipc" => format!("@coroipc-criterion-{}", std::process::id()),
        _ => format!("/tmp/coroipc-criterion-{}.sock", std::process::id()),
    };
    let mut p = Proc::spawn(&["--role".into(), "server".into(), transport.into(), endpoint.clone()]);
    p.expect_line("READY");
    (p, endpoint)
}

fn coroipc_client(endpoint: &str, max_message: u32) -> Client {
    Client::builder(endpoint, SERVICE)
        .sizes(Sizes { max_message_bytes: max_message, dispatch_ring_bytes: 1 << 20, ..Sizes::default() })
        .connect()
        .expect("connect to the bench server")
}

fn seq_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn rr64(c: &mut Criterion) {
    let mut g = c.benchmark_group("rr64");
    g.throughput(Throughput::Elements(1)).measurement_time(Duration::from_secs(3)).sample_size(20);
    let (srv, ep) = server("coroipc");
    let client = coroipc_client(&ep, 0);
    let mut seq = 0u64;
    g.bench_function("coroipc", |b| {
        let mut req = [0u8; 64 - HEADER];
        let mut resp = [0u8; 64 - HEADER];
        b.iter(|| {
            seq += 1;
            req[..8].copy_from_slice(&seq.to_le_bytes());
            client.call(cmd::ECHO, &req, &mut resp).expect("call");
            assert_eq!(seq_of(&resp), seq, "sequence");
        })
    });
    drop(client);
    drop(srv);
    let (srv, ep) = server("uds");
    let mut s = UnixStream::connect(&ep).expect("connect uds");
    g.bench_function("uds", |b| {
        let payload = [0u8; 64 - HEADER];
        let mut buf = Vec::new();
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            let mut p = payload;
            p[..8].copy_from_slice(&seq.to_le_bytes());
            uds::write_frame(&mut s, u32::from(cmd::ECHO), seq, &p).expect("write");
            uds::read_frame(&mut s, &mut buf).expect("read");
            assert_eq!(seq_of(&buf[HEADER..]), seq, "sequence");
        })
    });
    drop(srv);
    g.finish();
}

fn ev64(c: &mut Criterion) {
    let mut g = c.benchmark_group("ev64");
    g.throughput(Throughput::Elements(1)).measurement_time(Duration::from_secs(3)).sample_size(20);
    let (srv, ep) = server("coroipc");
    let client = coroipc_client(&ep, 0);
    g.bench_function("coroipc", |b| {
        b.iter_custom(|n| {
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&n.to_le_bytes());
            req[8..].copy_from_slice(&64u64.to_le_bytes());
            let t0 = Instant::now();
            client.call(cmd::STREAM, &req, &mut []).expect("start stream");
            for seq in 0..n {
                let m = client.recv_dispatch_in_place(Some(Duration::from_secs(30))).expect("dispatch");
                assert_eq!(seq_of(&m), seq, "sequence");
            }
            t0.elapsed()
        })
    });
    drop(client);
    drop(srv);
    let (srv, ep) = server("uds");
    g.bench_function("uds", |b| {
        b.iter_custom(|n| {
            let mut s = UnixStream::connect(&ep).expect("connect uds");
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&n.to_le_bytes());
            req[8..].copy_from_slice(&64u64.to_le_bytes());
            let mut buf = Vec::new();
            let t0 = Instant::now();
            uds::write_frame(&mut s, u32::from(cmd::STREAM), 0, &req).expect("write");
            let mut r = std::io::BufReader::with_capacity(1 << 16, s);
            uds::read_frame(&mut r, &mut buf).expect("ack");
            for seq in 0..n {
                uds::read_frame(&mut r, &mut buf).expect("dispatch");
                assert_eq!(seq_of(&buf[HEADER..]), seq, "sequence");
            }
            t0.elapsed()
        })
    });
    drop(srv);
    g.finish();
}

fn rr1m(c: &mut Criterion) {
    const MIB: usize = 1 << 20;
    let mut g = c.benchmark_group("rr1m");
    g.throughput(Throughput::Bytes(MIB as u64)).measurement_time(Duration::from_secs(3)).sample_size(10);
    let (srv, ep) = server("coroipc");
    let client = coroipc_client(&ep, MIB as u32);
    let mut req = vec![0x5au8; MIB - HEADER];
    let mut seq = 0u64;
    g.bench_function("coroipc", |b| {
        let mut resp = [0u8; 64];
        b.iter(|| {
            seq += 1;
            req[..8].copy_from_slice(&seq.to_le_bytes());
            client.call_vectored(cmd::SINK, &[IoSlice::new(&req)], &mut resp).expect("call");
            assert_eq!(seq_of(&resp), seq, "sequence");
        })
    });
    drop(client);
    drop(srv);
    let (srv, ep) = server("uds");
    let mut s = UnixStream::connect(&ep).expect("connect uds");
    g.bench_function("uds", |b| {
        let mut buf = Vec::new();
        b.iter(|| {
            seq += 1;
            req[..8].copy_from_slice(&seq.to_le_bytes());
            uds::write_frame(&mut s, u32::from(cmd::SINK), seq, &req).expect("write");
            uds::read_frame(&mut s, &mut buf).expect("read");
            assert_eq!(seq_of(&buf[HEADER..]), seq, "sequence");
        })
    });
    drop(srv);
    g.finish();
}

criterion_group!(benches, rr64, ev64, rr1m);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--role") {
        let (transport, endpoint) = (&args[i + 2], &args[i + 3]);
        let result = match transport.as_str() {
            "coroipc" => rpc::serve(endpoint, Duration::from_micros(50), 16),
            _ => uds::serve(endpoint),
        };
        if let Err(e) = result {
            eprintln!("bench server: {e}");
            std::process::exit(1);
        }
        return;
    }
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
}
