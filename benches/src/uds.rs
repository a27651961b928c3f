//! The `uds` transport: the same protocol over Unix domain stream sockets,
//! written the way a user would — a length-prefixed frame per message
//! (`u32` length, then our 16-byte header and the payload), a thread per
//! connection on the server, blocking reads and writes, a `BufWriter` for
//! the dispatch stream.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use coroipc_transport::message::MessageHeader;

use crate::report::{histogram, now_ns, Sample};
use crate::workload::{cmd, Params, Workload, HEADER};

/// Writes one frame: length, header, payload.
pub fn write_frame(w: &mut impl Write, id: u32, seq: u64, payload: &[u8]) -> std::io::Result<()> {
    let len = (HEADER + payload.len()) as u32;
    let mut head = [0u8; 4 + HEADER];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..].copy_from_slice(&MessageHeader { id, flags: 0, seq }.encode());
    if payload.len() <= 256 {
        // One write for a small frame, as any sane user would.
        let mut frame = [0u8; 4 + HEADER + 256];
        frame[..head.len()].copy_from_slice(&head);
        frame[head.len()..head.len() + payload.len()].copy_from_slice(payload);
        w.write_all(&frame[..head.len() + payload.len()])
    } else {
        w.write_all(&head)?;
        w.write_all(payload)
    }
}

/// Reads one frame into `buf` (resized); returns its header.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<MessageHeader> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if !(HEADER..=(64 << 20)).contains(&len) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad frame length"));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(MessageHeader::decode(buf).expect("length checked"))
}

/// Runs the benchmark server on a socket at `path` until killed.
pub fn serve(path: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    println!("READY");
    for stream in listener.incoming() {
        let stream = stream?;
        std::thread::spawn(move || {
            let _ = serve_one(stream);
        });
    }
    Ok(())
}

fn serve_one(stream: UnixStream) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 16, stream.try_clone()?);
    let mut w = stream;
    let mut buf = Vec::new();
    loop {
        let h = read_frame(&mut r, &mut buf)?;
        let payload = &buf[HEADER..];
        match h.id as u16 {
            cmd::ECHO => write_frame(&mut w, 0, h.seq, payload)?,
            cmd::SINK => {
                let mut answer = [0u8; 64 - HEADER];
                let n = payload.len().min(8);
                answer[..n].copy_from_slice(&payload[..n]);
                write_frame(&mut w, 0, h.seq, &answer)?;
            }
            cmd::STREAM => {
                let count = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                let size = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes")) as usize;
                write_frame(&mut w, 0, h.seq, &[])?;
                let mut bw = BufWriter::with_capacity(1 << 16, w.try_clone()?);
                let mut msg = vec![0xa5u8; size - HEADER];
                for seq in 0..count {
                    msg[..8].copy_from_slice(&seq.to_le_bytes());
                    write_frame(&mut bw, 0, seq, &msg)?;
                }
                bw.flush()?;
            }
            _ => write_frame(&mut w, 2, h.seq, &[])?,
        }
    }
}

fn check_seq(buf: &[u8], seq: u64, what: &str) {
    assert_eq!(buf.get(HEADER..HEADER + 8), Some(&seq.to_le_bytes()[..]), "{what}: sequence number mismatch");
}

/// Runs one client of `p` against the server at `path`.
pub fn client(path: &str, p: Params) -> Sample {
    let payload_len = p.size.saturating_sub(HEADER).max(8);
    let connect = || UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {path}: {e}"));
    let mut buf = Vec::new();
    match p.workload {
        Workload::Rr64 | Workload::Rr64Sleep | Workload::Rr64Spin | Workload::Fanin => {
            let mut s = connect();
            let mut req = vec![0u8; payload_len];
            let mut hist = histogram();
            let warmup = (p.count / 10).clamp(100, 10_000);
            let mut start = now_ns();
            for seq in 0..p.count + warmup {
                if seq == warmup {
                    start = now_ns();
                }
                req[..8].copy_from_slice(&seq.to_le_bytes());
                let t0 = Instant::now();
                write_frame(&mut s, u32::from(cmd::ECHO), seq, &req).expect("uds write");
                read_frame(&mut s, &mut buf).expect("uds read");
                let dt = t0.elapsed().as_nanos() as u64;
                check_seq(&buf, seq, "uds rr");
                if seq >= warmup {
                    hist.record(dt).expect("in range");
                }
            }
            Sample::new(Some(&hist), p.count, 0, start, now_ns())
        }
        Workload::Rr64Async => async_round_trips(path, &p, payload_len),
        Workload::Rr64Pipe => {
            let s = connect();
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            let mut req = vec![0u8; payload_len];
            let mut in_flight = VecDeque::new();
            let (mut sent, mut done) = (0u64, 0u64);
            let start = now_ns();
            while done < p.count {
                while sent < p.count && in_flight.len() < crate::rpc::PIPELINE_DEPTH {
                    req[..8].copy_from_slice(&sent.to_le_bytes());
                    write_frame(&mut w, u32::from(cmd::ECHO), sent, &req).expect("uds write");
                    in_flight.push_back(sent);
                    sent += 1;
                }
                read_frame(&mut r, &mut buf).expect("uds read");
                let seq = in_flight.pop_front().expect("in flight");
                check_seq(&buf, seq, "uds pipelined");
                done += 1;
            }
            Sample::new(None, p.count, 0, start, now_ns())
        }
        Workload::Rr1m => {
            let mut s = connect();
            let mut req = vec![0x5au8; payload_len];
            let warmup = 10;
            let mut start = now_ns();
            for seq in 0..p.count + warmup {
                if seq == warmup {
                    start = now_ns();
                }
                req[..8].copy_from_slice(&seq.to_le_bytes());
                write_frame(&mut s, u32::from(cmd::SINK), seq, &req).expect("uds write");
                read_frame(&mut s, &mut buf).expect("uds read");
                check_seq(&buf, seq, "uds rr1m");
            }
            Sample::new(None, p.count, p.count * p.size as u64, start, now_ns())
        }
        Workload::Ev64 | Workload::Ev4k => {
            let mut s = connect();
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&p.count.to_le_bytes());
            req[8..].copy_from_slice(&(p.size as u64).to_le_bytes());
            let start = now_ns();
            write_frame(&mut s, u32::from(cmd::STREAM), 0, &req).expect("uds write");
            let mut r = BufReader::with_capacity(1 << 16, s);
            read_frame(&mut r, &mut buf).expect("stream ack");
            for seq in 0..p.count {
                read_frame(&mut r, &mut buf).expect("uds dispatch");
                assert_eq!(buf.len(), p.size, "dispatch size");
                check_seq(&buf, seq, "uds dispatch");
            }
            Sample::new(None, p.count, p.count * p.size as u64, start, now_ns())
        }
        Workload::Connect => {
            let mut hist = histogram();
            let start = now_ns();
            for seq in 0..p.count {
                let t0 = Instant::now();
                let mut s = connect();
                write_frame(&mut s, u32::from(cmd::ECHO), seq, &seq.to_le_bytes()).expect("uds write");
                read_frame(&mut s, &mut buf).expect("uds read");
                check_seq(&buf, seq, "uds connect");
                drop(s);
                hist.record(t0.elapsed().as_nanos() as u64).expect("in range");
            }
            Sample::new(Some(&hist), p.count, 0, start, now_ns())
        }
    }
}

/// `rr64` from tokio: one task calling in turn over a `tokio::net::UnixStream`
/// on the same runtime as the coroipc async client.
fn async_round_trips(path: &str, p: &Params, payload_len: usize) -> Sample {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = crate::rpc::async_runtime();
    let (path, count) = (path.to_owned(), p.count);
    rt.block_on(async move {
        tokio::spawn(async move {
            let mut s = tokio::net::UnixStream::connect(&path).await.expect("connect");
            let mut req = vec![0u8; payload_len];
            let mut frame = Vec::new();
            let mut buf = Vec::new();
            let mut hist = histogram();
            let warmup = (count / 10).clamp(100, 10_000);
            let mut start = now_ns();
            for seq in 0..count + warmup {
                if seq == warmup {
                    start = now_ns();
                }
                req[..8].copy_from_slice(&seq.to_le_bytes());
                let t0 = Instant::now();
                frame.clear();
                write_frame(&mut frame, u32::from(cmd::ECHO), seq, &req).expect("frame");
                s.write_all(&frame).await.expect("uds write");
                let mut len = [0u8; 4];
                s.read_exact(&mut len).await.expect("uds read");
                buf.resize(u32::from_le_bytes(len) as usize, 0);
                s.read_exact(&mut buf).await.expect("uds read");
                let dt = t0.elapsed().as_nanos() as u64;
                check_seq(&buf, seq, "uds async rr");
                if seq >= warmup {
                    hist.record(dt).expect("in range");
                }
            }
            Sample::new(Some(&hist), count, 0, start, now_ns())
        })
        .await
        .expect("the calling task")
    })
}
