//! `Client::connect` and `connect_nonblocking` against a server whose
//! accept backlog is full: the connect honours its timeout and the
//! nonblocking form never blocks.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error};
use rustix::io::Errno;
use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// A listener (in this process: only the kernel's backlog matters) that
/// never accepts, its backlog filled; the listener, the queued sockets and
/// the endpoint string.
fn full_backlog(tag: &str) -> (UnixListener, Vec<OwnedFd>, String) {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("coroipc-client-backlog-{tag}-{}", std::process::id());
    let listener =
        UnixListener::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap();
    let mut queued = Vec::new();
    loop {
        let s = socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        match connect(&s, &addr) {
            Ok(()) => queued.push(s),
            Err(Errno::AGAIN) => break,
            Err(e) => panic!("unexpected connect error {e}"),
        }
        assert!(queued.len() < 100_000, "the backlog never filled");
    }
    (listener, queued, format!("@{name}"))
}

/// Runs `f` on a thread; a hang past `limit` fails the test.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the connect hung")
}

#[test]
fn connect_with_a_1s_timeout_to_a_full_backlog_is_a_timeout_within_a_few_seconds() {
    let (_listener, _queued, endpoint) = full_backlog("blocking");
    let start = Instant::now();
    let result = within(Duration::from_secs(10), move || {
        Client::builder(&endpoint, 1).timeout(Duration::from_secs(1)).connect().map(|_| ())
    });
    let took = start.elapsed();
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    assert!(took < Duration::from_secs(5), "a 1 s connect took {took:?}");
}

#[test]
fn connect_nonblocking_to_a_full_backlog_returns_without_waiting_and_times_out() {
    let (_listener, _queued, endpoint) = full_backlog("nonblocking");
    let start = Instant::now();
    let result = within(Duration::from_secs(10), move || {
        let mut pending =
            Client::builder(&endpoint, 1).timeout(Duration::from_secs(1)).connect_nonblocking()?;
        loop {
            if pending.poll()? {
                return pending.finish().map(|_| ());
            }
            let mut fds = [rustix::event::PollFd::new(&pending, rustix::event::PollFlags::IN)];
            let ts = rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 };
            let _ = rustix::event::poll(&mut fds, Some(&ts));
        }
    });
    let took = start.elapsed();
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    assert!(took < Duration::from_secs(5), "a 1 s connect took {took:?}");
}
