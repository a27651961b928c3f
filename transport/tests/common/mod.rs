//! Shared helpers of the transport's real-process tests.
//!
//! **Self re-exec.** Cross-process behaviour is tested with real processes:
//! a test spawns its own test binary ([`std::env::current_exe`]) running one
//! `#[ignore]`d helper test (conventionally named `child`) with
//! `--ignored --exact child --nocapture --test-threads=1`, and tells it its
//! role through environment variables ([`ROLE`], [`EP`], …). The child
//! reports on stdout with lines containing a `@@MARKER` (libtest's own
//! output shares that stream, so markers are searched anywhere in a line);
//! the parent waits for them with timeouts ([`ChildProc::expect`]). Every
//! child also exits when its stdin closes, so a parent that dies leaves no
//! orphan behind, and [`ChildProc`] kills (SIGKILL) and reaps on drop.
//!
//! **Test server.** [`TestServer`] is a minimal single-threaded server loop
//! on the transport's public API (`Listener::try_accept`,
//! `PendingHandshake`, `ServerChannel`) that never blocks on one peer: it
//! accepts, reads hellos without blocking, refuses or accepts, echoes
//! requests, dispatches on demand, reaps dead peers, and sleeps in `poll(2)`
//! on everything. It runs in a child process ([`child_main`], role
//! `server`) or on a thread of the test process ([`ServerThread`]).
//!
//! **Resources.** [`open_fds`] and [`memfd_maps`] measure this process from
//! `/proc/self`, so a test can check that a server freed everything.
#![allow(dead_code, missing_docs)]

use std::io::{BufRead, IoSlice, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coroipc_transport::channel::{
    negotiate, ChannelError, ClientChannel, ConnectError, Limits, PendingHandshake, ServerChannel,
};
use coroipc_transport::handshake::{ClientHello, Refusal, RingSizes};
use coroipc_transport::message::{MessageHeader, HEADER_LEN};
use coroipc_transport::socket::{Endpoint, Listener};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

// ---------------------------------------------------------------------------
// Protocol of the test server
// ---------------------------------------------------------------------------

/// The service anybody may use.
pub const SERVICE_ECHO: u16 = 1;
/// A service whose authentication callback admits only uid
/// [`PRIVILEGED_UID`], which no test runs as: every connect is refused
/// with `AccessDenied` on the kernel-given credentials.
pub const SERVICE_PRIVILEGED: u16 = 2;
/// The only uid [`SERVICE_PRIVILEGED`] admits.
pub const PRIVILEGED_UID: u32 = 0xfffe_fffe;

/// Request: answered with the request itself (header and payload).
pub const CMD_ECHO: u32 = 1;
/// Request with a `u32` payload `n`: the server sends up to `n` dispatch
/// messages (stopping at flow control) and answers with the number sent.
pub const CMD_DISPATCH: u32 = 2;
/// Request with a `u32` payload `ms`: no answer; the server closes the
/// connection cleanly `ms` milliseconds later and reports
/// `@@CLOSED ... at=<monotonic ns>` (the instant just before `close()`).
pub const CMD_CLOSE_AFTER: u32 = 3;

/// Dispatch message id the test server uses.
pub const DISPATCH_ID: u32 = 7;

/// Small rings, so that thousands of connections stay cheap.
pub const SMALL: RingSizes = RingSizes {
    request_ring_bytes: 4096,
    response_ring_bytes: 4096,
    dispatch_ring_bytes: 4096,
    max_message_bytes: 512,
};

/// A request or response: header plus payload.
pub fn message(id: u32, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = MessageHeader { id, flags: 0, seq }.encode().to_vec();
    m.extend_from_slice(payload);
    m
}

/// One echo round trip on `client`; checks the answer.
///
/// # Panics
///
/// If anything fails or the echo differs.
pub fn echo_round_trip(client: &mut ClientChannel, seq: u64, timeout: Duration) {
    let req = message(CMD_ECHO, seq, format!("ping {seq}").as_bytes());
    let deadline = Instant::now() + timeout;
    client.requests().send(&[IoSlice::new(&req)], Some(deadline)).expect("send request");
    client.requests().wait_response(Some(deadline)).expect("wait for echo");
    let got = client.requests().peek_response().expect("peek echo").expect("a response is ready").to_vec();
    client.requests().release_response();
    assert_eq!(got, req, "the server echoes the request byte for byte");
}

/// A hello for `service` with `sizes`.
pub fn hello(service: u16, sizes: RingSizes) -> ClientHello {
    ClientHello { service, flags: 0, sizes }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    coroipc_testkit::procfs::open_fds() as usize
}

/// Mappings of transport segments in this process: (count, bytes).
pub fn memfd_maps() -> (usize, u64) {
    let (count, bytes) = coroipc_testkit::procfs::memfd_maps();
    (count as usize, bytes)
}

/// A field of `/proc/self/status` in kB (e.g. `RssShmem`, `VmSize`).
pub fn status_kb(field: &str) -> u64 {
    coroipc_testkit::procfs::status_field(field)
}

/// What [`resources`] measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resources {
    pub fds: usize,
    pub memfd_maps: usize,
    pub memfd_bytes: u64,
    pub rss_shmem_kb: u64,
}

/// The process's descriptors and segment mappings now.
pub fn resources() -> Resources {
    let (memfd_maps, memfd_bytes) = memfd_maps();
    Resources { fds: open_fds(), memfd_maps, memfd_bytes, rss_shmem_kb: status_kb("RssShmem") }
}

pub use coroipc_testkit::mono_ns;

/// Milliseconds between two [`mono_ns`] readings (negative if `later`
/// came first).
pub fn ms_between(earlier: u64, later: u64) -> f64 {
    (later as f64 - earlier as f64) / 1e6
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

/// A fresh abstract endpoint, parsed from its `@name` form.
pub fn abstract_endpoint(tag: &str) -> Endpoint {
    Endpoint::parse(&coroipc_testkit::unique_endpoint("it", tag)).expect("valid endpoint")
}

/// A socket path in a fresh private directory, removed on drop.
pub struct TempEndpoint {
    dir: PathBuf,
    pub endpoint: Endpoint,
}

impl TempEndpoint {
    pub fn new(tag: &str) -> Self {
        let name = coroipc_testkit::unique_endpoint("it", tag);
        let dir = std::env::temp_dir().join(name.trim_start_matches('@'));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create socket dir");
        let endpoint = Endpoint::Path(dir.join("s.sock"));
        Self { dir, endpoint }
    }
}

impl Drop for TempEndpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// Environment variable naming the child's role.
pub const ROLE: &str = "COROIPC_TEST_ROLE";
/// Environment variable with the endpoint (`@name` or a path).
pub const EP: &str = "COROIPC_TEST_EP";
/// Environment variable: the server's connection limit.
pub const MAX_CONN: &str = "COROIPC_TEST_MAX_CONN";
/// Environment variable: "0" makes a `client` child skip its echo.
pub const ECHO: &str = "COROIPC_TEST_ECHO";
/// Environment variable: "1" makes a `client` child do round trips
/// without pause after `@@READY` until it is killed.
pub const FLOOD: &str = "COROIPC_TEST_FLOOD";
/// Environment variable: bytes of the hello a `half-hello` child sends.
pub const HELLO_BYTES: &str = "COROIPC_TEST_HELLO_BYTES";

/// The name of the `#[ignore]` helper test every test file defines.
pub const CHILD_TEST: &str = "child";

#[allow(unused_imports)] // each test binary uses a different subset
pub use coroipc_testkit::{field, num, report, ChildProc};

/// Spawns this test binary's [`CHILD_TEST`] helper as `role`, with `envs`.
pub fn spawn_child(role: &str, envs: &[(&str, String)]) -> ChildProc {
    let mut all = vec![(ROLE, role.to_string())];
    all.extend(envs.iter().map(|(k, v)| (*k, v.clone())));
    coroipc_testkit::spawn(CHILD_TEST, &all)
}

/// Blocks until stdin closes (the parent went away) or a line arrives;
/// returns the line, `None` at end of input.
pub fn read_stdin_line() -> Option<String> {
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim().to_string()),
    }
}

/// The endpoint given to a child.
pub fn env_endpoint() -> Endpoint {
    Endpoint::parse(&std::env::var(EP).expect("endpoint in env")).expect("valid endpoint")
}

/// The body of every test file's `child` helper for the generic roles;
/// returns `false` for a role it does not know (the file handles it), and
/// does nothing without a role (a plain `cargo test -- --ignored`).
///
/// Roles:
/// - `server`: runs a [`TestServer`] on [`EP`] (connection limit
///   [`MAX_CONN`]) until stdin closes; reports `@@READY` then every event.
/// - `client`: connects to [`SERVICE_ECHO`] with [`SMALL`] sizes, does one
///   echo (unless [`ECHO`]=0), reports `@@READY`, then on a `CLOSE` line
///   closes cleanly and reports `@@CLOSED at=<ns>`; exits when stdin closes.
///   With [`FLOOD`]=1 it does round trips without pause after `@@READY`.
/// - `half-hello`: connects, sends the first [`HELLO_BYTES`] bytes of a
///   hello, reports `@@BLOCKED` and stalls until stdin closes.
pub fn child_main(other: impl FnOnce(&str) -> bool) {
    let Ok(role) = std::env::var(ROLE) else { return };
    match role.as_str() {
        "server" => child_server(),
        "client" => child_client(),
        "half-hello" => child_half_hello(),
        other_role => assert!(other(other_role), "unknown child role {other_role}"),
    }
}

fn child_server() {
    let ep = env_endpoint();
    let max_connections = std::env::var(MAX_CONN).ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
    let config = ServerConfig { max_connections, ..ServerConfig::default() };
    let mut server = TestServer::bind(&ep, config).expect("bind");
    // Exit when the parent closes our stdin (or dies).
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        std::process::exit(0);
    });
    let r = resources();
    report("READY", &format!("pid={} fds={} memfd={}", std::process::id(), r.fds, r.memfd_bytes));
    let stop = AtomicBool::new(false);
    server.run(&stop, &mut |ev: Event| {
        let r = resources();
        report(ev.marker(), &format!("{} fds={} memfd={}", ev.text(), r.fds, r.memfd_bytes));
    });
}

fn child_client() {
    let ep = env_endpoint();
    let mut client = ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("client child cannot connect: {e}"));
    if std::env::var(ECHO).as_deref() != Ok("0") {
        echo_round_trip(&mut client, 1, Duration::from_secs(10));
    }
    let s = client.sizes();
    let cred = client.server_credentials();
    report(
        "READY",
        &format!(
            "pid={} server_pid={} server_uid={} server_gid={} sizes={},{},{},{}",
            std::process::id(),
            cred.pid.unwrap_or(0),
            cred.uid,
            cred.gid,
            s.request_ring_bytes,
            s.response_ring_bytes,
            s.dispatch_ring_bytes,
            s.max_message_bytes
        ),
    );
    if std::env::var(FLOOD).as_deref() == Ok("1") {
        // Round trips until killed: a SIGKILL lands mid-request.
        std::thread::spawn(move || {
            for seq in 2.. {
                echo_round_trip(&mut client, seq, Duration::from_secs(10));
            }
        });
        while read_stdin_line().is_some() {}
        return;
    }
    let mut client = Some(client);
    while let Some(line) = read_stdin_line() {
        if line == "CLOSE" {
            let at = mono_ns();
            drop(client.take());
            report("CLOSED", &format!("at={at}"));
        }
    }
}

fn child_half_hello() {
    let ep = env_endpoint();
    let n: usize = std::env::var(HELLO_BYTES).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let stream = coroipc_transport::socket::Stream::connect(&ep).expect("connect");
    let bytes = hello(SERVICE_ECHO, SMALL).encode();
    if n > 0 {
        stream.send_with_fds(&bytes[..n.min(bytes.len())], &[]).expect("send part of a hello");
    }
    report("BLOCKED", &format!("pid={} sent={n}", std::process::id()));
    let _ = read_stdin_line();
    drop(stream);
}

// ---------------------------------------------------------------------------
// The test server
// ---------------------------------------------------------------------------

/// How the test server decides and serves.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    pub limits: Limits,
    /// Refuse with `ConnectionLimit` beyond this many live connections.
    pub max_connections: usize,
    /// Drop a client that has not sent its hello within this.
    pub handshake_timeout: Duration,
    /// How long an echo may wait for response space.
    pub response_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_connections: usize::MAX,
            handshake_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_millis(200),
        }
    }
}

/// What the test server saw.
#[derive(Clone, Debug)]
pub enum Event {
    /// A connection was set up.
    Accepted { pid: Option<u32>, uid: u32, gid: u32, sizes: RingSizes },
    /// A hello was answered with a refusal.
    Refused(Refusal),
    /// A handshake was abandoned (client closed, died, or timed out).
    HandshakeFailed(String),
    /// A connection ended: `Ok(at)` for a clean close the client asked
    /// for (`at` = [`mono_ns`] just before `close()`), else the error.
    Closed { pid: Option<u32>, reason: Result<u64, ChannelError> },
}

impl Event {
    /// The `@@` marker a child server reports the event with.
    pub fn marker(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "ACCEPTED",
            Self::Refused(_) => "REFUSED",
            Self::HandshakeFailed(_) => "HSFAIL",
            Self::Closed { .. } => "CLOSED",
        }
    }

    /// The event as `key=value` text.
    pub fn text(&self) -> String {
        match self {
            Self::Accepted { pid, uid, gid, sizes: s } => format!(
                "pid={} uid={uid} gid={gid} sizes={},{},{},{}",
                pid.unwrap_or(0),
                s.request_ring_bytes,
                s.response_ring_bytes,
                s.dispatch_ring_bytes,
                s.max_message_bytes
            ),
            Self::Refused(r) => format!("refusal={r:?}"),
            Self::HandshakeFailed(why) => format!("why={}", why.replace(' ', "_")),
            Self::Closed { pid, reason } => match reason {
                Ok(at) => format!("pid={} reason=Requested at={at}", pid.unwrap_or(0)),
                Err(e) => format!("pid={} reason={}", pid.unwrap_or(0), format!("{e:?}").replace(' ', "")),
            },
        }
    }
}

struct Conn {
    channel: ServerChannel,
    pid: Option<u32>,
    close_at: Option<Instant>,
    dispatched: u64,
}

/// A minimal single-threaded server loop over the transport.
pub struct TestServer {
    listener: Listener,
    config: ServerConfig,
    pending: Vec<PendingHandshake>,
    conns: Vec<Conn>,
    buf: Vec<u8>,
}

impl TestServer {
    /// Binds `endpoint`.
    ///
    /// # Errors
    ///
    /// The bind error.
    pub fn bind(endpoint: &Endpoint, config: ServerConfig) -> std::io::Result<Self> {
        Ok(Self {
            listener: Listener::bind(endpoint)?,
            config,
            pending: Vec::new(),
            conns: Vec::new(),
            buf: Vec::new(),
        })
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Serves until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool, on_event: &mut dyn FnMut(Event)) {
        while !stop.load(Ordering::Acquire) {
            self.turn(Duration::from_millis(20), on_event);
        }
    }

    /// One turn: accept, progress handshakes, serve, reap; then, if nothing
    /// happened, sleep in `poll(2)` on every descriptor for at most
    /// `max_sleep`.
    pub fn turn(&mut self, max_sleep: Duration, on_event: &mut dyn FnMut(Event)) {
        let mut busy = false;
        loop {
            match self.listener.try_accept() {
                Ok(Some(stream)) => {
                    busy = true;
                    match PendingHandshake::new(stream) {
                        Ok(p) => self.pending.push(p),
                        Err(e) => on_event(Event::HandshakeFailed(format!("new: {e}"))),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    on_event(Event::HandshakeFailed(format!("accept: {e}")));
                    break;
                }
            }
        }
        busy |= self.progress_handshakes(on_event);
        busy |= self.serve(on_event);
        if !busy {
            self.sleep(max_sleep);
        }
    }

    fn progress_handshakes(&mut self, on_event: &mut dyn FnMut(Event)) -> bool {
        let mut busy = false;
        let mut i = 0;
        while i < self.pending.len() {
            match self.pending[i].poll_hello() {
                Ok(None) => {
                    if self.pending[i].started().elapsed() > self.config.handshake_timeout {
                        drop(self.pending.swap_remove(i));
                        on_event(Event::HandshakeFailed("timeout".into()));
                        busy = true;
                    } else {
                        i += 1;
                    }
                }
                Ok(Some(Ok(hello))) => {
                    let p = self.pending.swap_remove(i);
                    self.decide(p, hello, on_event);
                    busy = true;
                }
                Ok(Some(Err(_))) => {
                    self.pending.swap_remove(i).refuse(Refusal::Invalid);
                    on_event(Event::Refused(Refusal::Invalid));
                    busy = true;
                }
                Err(e) => {
                    drop(self.pending.swap_remove(i));
                    on_event(Event::HandshakeFailed(e.to_string()));
                    busy = true;
                }
            }
        }
        busy
    }

    /// The application's decisions, in order: service, authentication
    /// (on the kernel's credentials), sizes, connection limit.
    fn decide(&mut self, p: PendingHandshake, hello: ClientHello, on_event: &mut dyn FnMut(Event)) {
        let peer = p.peer();
        let refusal = if hello.service != SERVICE_ECHO && hello.service != SERVICE_PRIVILEGED {
            Some(Refusal::NoSuchService)
        } else if hello.service == SERVICE_PRIVILEGED && peer.uid != PRIVILEGED_UID {
            Some(Refusal::AccessDenied)
        } else {
            None
        };
        let sizes = match refusal {
            Some(r) => Err(r),
            None => negotiate(&hello.sizes, &self.config.limits),
        };
        let sizes = match sizes {
            Ok(_) if self.conns.len() >= self.config.max_connections => Err(Refusal::ConnectionLimit),
            other => other,
        };
        match sizes {
            Err(r) => {
                p.refuse(r);
                on_event(Event::Refused(r));
            }
            Ok(sizes) => match p.accept(sizes, &self.config.limits) {
                Ok(channel) => {
                    on_event(Event::Accepted {
                        pid: peer.pid,
                        uid: peer.uid,
                        gid: peer.gid,
                        sizes: channel.sizes(),
                    });
                    self.conns.push(Conn { channel, pid: peer.pid, close_at: None, dispatched: 0 });
                }
                Err(e) => on_event(Event::HandshakeFailed(format!("accept: {e}"))),
            },
        }
    }

    fn serve(&mut self, on_event: &mut dyn FnMut(Event)) -> bool {
        let mut busy = false;
        let mut i = 0;
        while i < self.conns.len() {
            let end = self.serve_one(i, &mut busy);
            match end {
                None => i += 1,
                Some(reason) => {
                    let conn = self.conns.swap_remove(i);
                    drop(conn.channel);
                    on_event(Event::Closed { pid: conn.pid, reason });
                    busy = true;
                }
            }
        }
        busy
    }

    /// Serves connection `i`; `Some(reason)` if it must be dropped.
    fn serve_one(&mut self, i: usize, busy: &mut bool) -> Option<Result<u64, ChannelError>> {
        let conn = &mut self.conns[i];
        if let Some(at) = conn.close_at {
            if Instant::now() >= at {
                let ts = mono_ns();
                conn.channel.close();
                return Some(Ok(ts));
            }
        }
        // A bounded batch per turn, so one flooding client cannot starve
        // the others.
        for _ in 0..64 {
            match conn.channel.try_recv_request(&mut self.buf) {
                Ok(false) => break,
                Ok(true) => {
                    *busy = true;
                    if let Err(e) = handle(conn, &self.buf, self.config.response_timeout) {
                        return Some(Err(e));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
        if !conn.channel.peer_alive() {
            return Some(Err(ChannelError::PeerGone));
        }
        None
    }

    fn sleep(&mut self, max_sleep: Duration) {
        let mut timeout = max_sleep;
        if self.conns.iter().any(|c| c.close_at.is_some()) {
            timeout = timeout.min(Duration::from_millis(1));
        }
        if !self.pending.is_empty() {
            // Handshake deadlines.
            timeout = timeout.min(Duration::from_millis(50));
        }
        let mut woke = false;
        for c in &self.conns {
            woke |= c.channel.arm_requests();
        }
        if !woke {
            let mut fds: Vec<(BorrowedFd<'_>, PollFlags)> = vec![(self.listener.as_fd(), PollFlags::IN)];
            for p in &self.pending {
                fds.push((p.stream().as_fd(), PollFlags::IN | PollFlags::RDHUP));
            }
            for c in &self.conns {
                fds.push((c.channel.request_fd(), PollFlags::IN));
                fds.push((c.channel.socket_fd(), PollFlags::IN | PollFlags::RDHUP));
            }
            let mut pfds: Vec<PollFd<'_>> =
                fds.iter().map(|(fd, fl)| PollFd::from_borrowed_fd(*fd, *fl)).collect();
            let ts = Timespec::try_from(timeout).expect("small timeout");
            let _ = poll(&mut pfds, Some(&ts));
        }
        for c in &self.conns {
            c.channel.disarm_requests();
        }
    }
}

fn handle(conn: &mut Conn, req: &[u8], response_timeout: Duration) -> Result<(), ChannelError> {
    let Some(h) = MessageHeader::decode(req) else {
        return Err(ChannelError::TooBig { len: req.len(), max: 0 });
    };
    let payload = &req[HEADER_LEN..];
    let arg = payload.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match h.id {
        CMD_DISPATCH => {
            let mut sent = 0u32;
            while sent < arg {
                conn.dispatched += 1;
                let msg = message(DISPATCH_ID, conn.dispatched, &sent.to_le_bytes());
                match conn.channel.try_dispatch(&[IoSlice::new(&msg)]) {
                    Ok(_) => sent += 1,
                    Err(ChannelError::TryAgain) => break,
                    Err(e) => return Err(e),
                }
            }
            let answer = message(0, h.seq, &sent.to_le_bytes());
            conn.channel.send_response(&[IoSlice::new(&answer)], response_timeout)
        }
        CMD_CLOSE_AFTER => {
            conn.close_at = Some(Instant::now() + Duration::from_millis(arg.into()));
            Ok(())
        }
        _ => conn.channel.send_response(&[IoSlice::new(req)], response_timeout),
    }
}

/// A [`TestServer`] on a thread of this process, reporting events on a
/// channel; stopped and joined on drop (a panic in the server fails the
/// test).
pub struct ServerThread {
    pub endpoint: Endpoint,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    events: Receiver<Event>,
    backlog: Mutex<Vec<Event>>,
    connections: Arc<AtomicUsize>,
    pending: Arc<AtomicUsize>,
}

impl ServerThread {
    /// Binds `endpoint` (on the calling thread, so connects work at once)
    /// and serves on a new thread.
    pub fn spawn(endpoint: Endpoint, config: ServerConfig) -> Self {
        let mut server = TestServer::bind(&endpoint, config).expect("bind test server");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(AtomicUsize::new(0));
        let (tx, events): (Sender<Event>, _) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("test-server".into())
            .spawn({
                let stop = stop.clone();
                let connections = connections.clone();
                let pending = pending.clone();
                move || {
                    while !stop.load(Ordering::Acquire) {
                        server.turn(Duration::from_millis(10), &mut |ev| {
                            let _ = tx.send(ev);
                        });
                        connections.store(server.connections(), Ordering::Release);
                        pending.store(server.pending(), Ordering::Release);
                    }
                }
            })
            .expect("spawn server thread");
        Self {
            endpoint,
            stop,
            handle: Some(handle),
            events,
            backlog: Mutex::new(Vec::new()),
            connections,
            pending,
        }
    }

    /// Live connections (as of the server's last turn).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Handshakes in progress (as of the server's last turn).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// The next event, waiting up to `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Waits for an event matching `pred`; the others stay queued, in
    /// order, for later calls.
    ///
    /// # Panics
    ///
    /// If none comes within `timeout`.
    pub fn expect_event(&self, timeout: Duration, mut pred: impl FnMut(&Event) -> bool) -> Event {
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = backlog.iter().position(&mut pred) {
            return backlog.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) if pred(&ev) => return ev,
                Ok(ev) => backlog.push(ev),
                Err(_) => panic!("no matching server event within {timeout:?}; queued {backlog:?}"),
            }
        }
    }

    /// Every event queued now.
    pub fn drain_events(&self) -> Vec<Event> {
        let mut all = std::mem::take(&mut *self.backlog.lock().unwrap_or_else(|e| e.into_inner()));
        all.extend(self.events.try_iter());
        all
    }

    /// Waits until `pred()` holds.
    ///
    /// # Panics
    ///
    /// If it does not within `timeout`.
    pub fn wait_until(&self, timeout: Duration, what: &str, mut pred: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            assert!(Instant::now() < deadline, "server: {what} not reached within {timeout:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the server and joins its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            // A server stuck in a blocking call must fail the test, not
            // hang the test binary: give up on it after a while.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !h.is_finished() {
                assert!(std::thread::panicking(), "the test server thread is stuck (blocked in a call)");
                return;
            }
            let r = h.join();
            if r.is_err() && !std::thread::panicking() {
                panic!("the test server panicked");
            }
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Driving one handshake in the test process
// ---------------------------------------------------------------------------

/// Accepts one connection on `listener` and completes its handshake with
/// `limits` (server side, in this process).
///
/// # Panics
///
/// If nobody connects, or the handshake fails, within `timeout`.
pub fn accept_one(listener: &Listener, limits: &Limits, timeout: Duration) -> ServerChannel {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        if let Some(s) = listener.try_accept().expect("accept") {
            break s;
        }
        assert!(Instant::now() < deadline, "no client connected");
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut pending = PendingHandshake::new(stream).expect("pending handshake");
    let hello = loop {
        if let Some(h) = pending.poll_hello().expect("hello") {
            break h.expect("valid hello");
        }
        assert!(Instant::now() < deadline, "no hello arrived");
        std::thread::sleep(Duration::from_millis(1));
    };
    let sizes = negotiate(&hello.sizes, limits).expect("sizes within limits");
    pending.accept(sizes, limits).expect("accept")
}

/// Runs `f` on a thread and waits at most `timeout` for its result: a
/// hang is a test failure, not a stuck test run.
///
/// # Panics
///
/// If `f` panics or does not return within `timeout`.
pub fn within<T: Send + 'static>(timeout: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(RecvTimeoutError::Disconnected) => {
            let _ = h.join();
            panic!("{what}: panicked");
        }
        Err(RecvTimeoutError::Timeout) => panic!("{what}: hung for more than {timeout:?}"),
    }
}

/// Shorthand for a connect error's variant name (for messages).
pub fn connect_err_name(e: &ConnectError) -> String {
    format!("{e:?}")
}

// ---------------------------------------------------------------------------
// Descriptors whose last close blocks
// ---------------------------------------------------------------------------

/// A loopback TCP socket (127.0.0.1 only) whose **last** close blocks for
/// up to `linger`: `SO_LINGER` on, and unsent data queued towards a peer
/// that never reads (a listener that never accepts). A hostile peer passes
/// it with `SCM_RIGHTS` and drops its own copy, so that the receiver's
/// kernel runs that close in whichever thread drops the last reference.
///
/// Returns the socket and the [`LingerGuard`] keeping its peer; dropping
/// the guard resets the connection, which ends any lingering close.
pub fn lingering_socket(linger: Duration) -> (std::os::fd::OwnedFd, LingerGuard) {
    use rustix::net::sockopt::{set_socket_linger, set_socket_recv_buffer_size, set_socket_send_buffer_size};
    use std::io::Write;
    let peer = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback listener");
    set_socket_recv_buffer_size(&peer, 4096).expect("small receive buffer");
    let mut stream = std::net::TcpStream::connect(peer.local_addr().unwrap()).expect("loopback connect");
    set_socket_send_buffer_size(&stream, 4096).expect("small send buffer");
    stream.set_nonblocking(true).unwrap();
    let chunk = [0x55u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match stream.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the loopback socket: {e}"),
        }
        assert!(Instant::now() < deadline, "the loopback socket never filled");
    }
    set_socket_linger(&stream, Some(linger)).expect("SO_LINGER");
    (stream.into(), LingerGuard { _peer: peer })
}

/// The never-reading peer of a [`lingering_socket`]; dropping it resets
/// the connection (the listener discards its unaccepted connections with
/// a reset), so a close still lingering on it returns.
pub struct LingerGuard {
    _peer: std::net::TcpListener,
}
