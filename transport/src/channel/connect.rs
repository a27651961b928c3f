//! The client's side of a handshake: connecting (a full accept backlog is
//! retried on a timer, never waited for in `connect(2)`), checking the
//! server's identity, reading the reply, and nothing after it.

use std::io::{self};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{epoll, poll, PollFd, PollFlags, Timespec};

use crate::handshake::{ClientHello, HandshakeDecodeError, HELLO_LEN, REPLY_LEN};
use crate::socket::{release_in_background, stop_descriptors, Endpoint, SocketRecvError, Stream};

use super::{ClientChannel, ConnectError, REPLY_FDS};

/// How a client connects: the deadline and whom it accepts as the server.
///
/// # Examples
///
/// ```
/// use coroipc_transport::channel::ConnectOptions;
/// use std::time::Duration;
///
/// // Only a server running as root will do.
/// let options = ConnectOptions::new(Duration::from_secs(5)).require_server_uid(0);
/// assert_eq!(options.server_uid, Some(0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Connecting and the whole handshake must finish within this.
    pub timeout: Duration,
    /// If set, the listener's uid (`SO_PEERCRED`, recorded by the kernel
    /// when the server called `listen(2)`) must be this one; checked right
    /// after `connect(2)`, before the hello is sent or anything the server
    /// sends is read.
    pub server_uid: Option<u32>,
}

impl ConnectOptions {
    /// Options with `timeout` and no identity requirement.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, server_uid: None }
    }

    /// Requires the server to run as `uid` ([`ConnectError::WrongServer`]
    /// otherwise): abstract names (`@name`) have no permissions, so any
    /// local user can bind one first.
    pub fn require_server_uid(mut self, uid: u32) -> Self {
        self.server_uid = Some(uid);
        self
    }
}

/// A client handshake in progress, for event loops: nothing in it blocks.
/// Poll [`fd`](Self::fd) for readability and call [`poll`](Self::poll)
/// until it returns `true`, then [`finish`](Self::finish) (coroipc had no
/// such thing; a non-blocking connect lets a single-threaded application
/// connect without stalling its loop).
///
/// Connection life cycle (each step happens inside [`poll`](Self::poll),
/// none waits):
///
/// | state | `fd` is readable when | next |
/// |---|---|---|
/// | connecting: the server's accept backlog was full | the retry timer fires (1 ms, doubling to 64 ms, never past the deadline) | connected once `connect(2)` succeeds; `Timeout` at the deadline |
/// | connected, hello sent, reply incomplete | reply bytes or a hang-up arrive | reply complete (`poll` returns `true`); `Timeout` at the deadline |
#[derive(Debug)]
pub struct PendingConnect {
    stream: Stream,
    /// `Some` while `connect(2)` has not succeeded (full backlog).
    connecting: Option<Connecting>,
    /// The retry timer and the epoll set behind [`fd`](Self::fd), made the
    /// first time the backlog is full (an immediate connect needs neither).
    retry: Option<Retry>,
    reply: [u8; REPLY_LEN],
    got: usize,
    fds: Vec<OwnedFd>,
    deadline: Instant,
    /// The uid the listener must have ([`ConnectOptions::server_uid`]).
    server_uid: Option<u32>,
}

/// Checks the listener's uid, if one is required, before anything is sent.
fn check_server(stream: &Stream, required: Option<u32>) -> Result<(), ConnectError> {
    let Some(expected) = required else { return Ok(()) };
    let actual = stream.peer_credentials()?.uid;
    if actual == expected {
        Ok(())
    } else {
        Err(ConnectError::WrongServer { expected, actual })
    }
}

/// A connect waiting for room in the server's backlog.
#[derive(Debug)]
struct Connecting {
    endpoint: Endpoint,
    hello: [u8; HELLO_LEN],
    backoff: Duration,
}

/// What [`PendingConnect::fd`] stands for after a full backlog: an epoll
/// set holding the retry timer, and the socket once connected, so that the
/// descriptor an event loop registered stays the same across states.
#[derive(Debug)]
struct Retry {
    epoll: OwnedFd,
    timer: OwnedFd,
}

/// The first and the longest pause between connect attempts to a full
/// backlog.
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_MAX: Duration = Duration::from_millis(64);

impl Retry {
    fn new() -> io::Result<Self> {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let timer =
            timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK)?;
        epoll::add(&epoll, &timer, epoll::EventData::new_u64(0), epoll::EventFlags::IN)?;
        Ok(Self { epoll, timer })
    }

    /// Makes the timer fire once, `after` from now.
    fn arm(&self, after: Duration) -> io::Result<()> {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags};
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        // A zero `it_value` would disarm the timer: fire after 1 ns at least.
        let after = after.max(Duration::from_nanos(1));
        let value = Timespec { tv_sec: after.as_secs() as i64, tv_nsec: after.subsec_nanos().into() };
        timerfd_settime(
            &self.timer,
            TimerfdTimerFlags::empty(),
            &Itimerspec { it_interval: zero, it_value: value },
        )?;
        Ok(())
    }

    /// Consumes a pending expiry (the timer stays readable until read).
    fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.timer, &mut buf);
    }
}

impl PendingConnect {
    /// Starts connecting to `endpoint` and, once connected, sends the hello;
    /// never waits, not even for a full accept backlog (the attempt is then
    /// retried by [`poll`](Self::poll) until the deadline).
    ///
    /// # Errors
    ///
    /// `Io` if nobody listens (`ECONNREFUSED`, `ENOENT`, `EACCES`, …) or a
    /// descriptor cannot be made.
    pub fn connect(
        endpoint: &Endpoint,
        hello: &ClientHello,
        timeout: Duration,
    ) -> Result<Self, ConnectError> {
        Self::connect_with(endpoint, hello, &ConnectOptions::new(timeout))
    }

    /// [`connect`](Self::connect) with [`ConnectOptions`]: a deadline, and
    /// optionally the uid the server must run as.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect), plus [`ConnectError::WrongServer`]
    /// (here or from [`poll`](Self::poll), once the connect completes).
    pub fn connect_with(
        endpoint: &Endpoint,
        hello: &ClientHello,
        options: &ConnectOptions,
    ) -> Result<Self, ConnectError> {
        let deadline = Instant::now() + options.timeout;
        let (stream, connected) = Stream::connect_nonblocking(endpoint)?;
        if connected {
            return Self::started(stream, hello, deadline, options.server_uid);
        }
        let retry = Retry::new()?;
        let connecting =
            Connecting { endpoint: endpoint.clone(), hello: hello.encode(), backoff: RETRY_FIRST };
        retry.arm(RETRY_FIRST.min(deadline.saturating_duration_since(Instant::now())))?;
        Ok(Self {
            stream,
            connecting: Some(connecting),
            retry: Some(retry),
            reply: [0; REPLY_LEN],
            got: 0,
            fds: Vec::new(),
            deadline,
            server_uid: options.server_uid,
        })
    }

    /// Starts the handshake on a connected stream.
    ///
    /// # Errors
    ///
    /// `Io` if the hello cannot be sent.
    pub fn start(stream: Stream, hello: &ClientHello, timeout: Duration) -> Result<Self, ConnectError> {
        Self::started(stream, hello, Instant::now() + timeout, None)
    }

    fn started(
        stream: Stream,
        hello: &ClientHello,
        deadline: Instant,
        server_uid: Option<u32>,
    ) -> Result<Self, ConnectError> {
        check_server(&stream, server_uid)?;
        Self::send_hello(&stream, &hello.encode())?;
        Ok(Self {
            stream,
            connecting: None,
            retry: None,
            reply: [0; REPLY_LEN],
            got: 0,
            fds: Vec::new(),
            deadline,
            server_uid,
        })
    }

    fn send_hello(stream: &Stream, hello: &[u8; HELLO_LEN]) -> Result<(), ConnectError> {
        stream.as_std().set_nonblocking(true)?;
        // 32 bytes into a fresh socket's empty buffer: never `WouldBlock`.
        stream.send_with_fds(hello, &[])?;
        Ok(())
    }

    /// What to wait on: readable when [`poll`](Self::poll) has something
    /// to do (the reply or a hang-up arrived, a retry of a connect to a
    /// full backlog is due, or the deadline passed). The same descriptor
    /// for the whole handshake.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.retry {
            Some(retry) => retry.epoll.as_fd(),
            None => self.stream.as_fd(),
        }
    }

    /// Retries a connect to a full backlog; `true` once connected.
    fn poll_connect(&mut self) -> Result<bool, ConnectError> {
        let Some(connecting) = &mut self.connecting else { return Ok(true) };
        let Some(retry) = &self.retry else { return Ok(true) };
        retry.drain();
        if self.stream.retry_connect(&connecting.endpoint)? {
            check_server(&self.stream, self.server_uid)?;
            Self::send_hello(&self.stream, &connecting.hello)?;
            epoll::add(&retry.epoll, &self.stream, epoll::EventData::new_u64(1), epoll::EventFlags::IN)
                .map_err(io::Error::from)?;
            self.connecting = None;
            return Ok(true);
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(ConnectError::Timeout);
        }
        connecting.backoff = (connecting.backoff * 2).min(RETRY_MAX);
        retry.arm(connecting.backoff.min(self.deadline - now))?;
        Ok(false)
    }

    /// Does what is due: retries the connect while the server's backlog is
    /// full, then reads what has arrived; returns `true` once the whole
    /// reply is there (then call [`finish`](Self::finish)).
    ///
    /// # Errors
    ///
    /// As [`ClientChannel::connect`], including `Timeout` once the deadline
    /// given at the start has passed.
    pub fn poll(&mut self) -> Result<bool, ConnectError> {
        let polled = self.poll_reply();
        if polled.is_err() {
            // The caller drops us next: what the server queued on the socket
            // must not be closed in the caller's thread.
            let _ = stop_descriptors(&self.stream);
            release_in_background(self.stream.as_fd(), false);
        }
        polled
    }

    fn poll_reply(&mut self) -> Result<bool, ConnectError> {
        if !self.poll_connect()? {
            return Ok(false);
        }
        while self.got < REPLY_LEN {
            match self.stream.recv_with_fds(&mut self.reply[self.got..], REPLY_FDS - self.fds.len()) {
                Ok((0, _)) => {
                    return Err(ConnectError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed during handshake",
                    )))
                }
                Ok((n, more)) => {
                    self.got += n;
                    self.fds.extend(more);
                }
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.deadline {
                        return Err(ConnectError::Timeout);
                    }
                    return Ok(false);
                }
                Err(SocketRecvError::Io(e)) => return Err(e.into()),
                Err(_) => return Err(ConnectError::Descriptors("truncated or too many")),
            }
        }
        self.nothing_after_the_reply()?;
        Ok(true)
    }

    /// The reply is complete: from now on the socket takes no descriptors
    /// (where the kernel can refuse them), and anything the server sent
    /// beyond the reply before that is an error — its descriptors go to
    /// the closer thread, so that no later close of this socket (when the
    /// connection ends) drops them in the caller's thread.
    fn nothing_after_the_reply(&mut self) -> Result<(), ConnectError> {
        stop_descriptors(&self.stream)?;
        let mut extra = [0u8; 1];
        loop {
            return match self.stream.recv_with_fds(&mut extra, 0) {
                // End of stream (a refusal is followed by a close), or
                // nothing more: as it should be.
                Ok((0, _)) => Ok(()),
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok((n, _)) => Err(ConnectError::Handshake(HandshakeDecodeError::WrongLength {
                    expected: REPLY_LEN,
                    actual: REPLY_LEN + n,
                })),
                // A server that closed without reading our hello resets the
                // connection (`ECONNRESET`) after its reply, e.g. a refusal
                // out of descriptors: the reply stands, the hang-up is seen
                // later.
                Err(SocketRecvError::Io(_)) => Ok(()),
                Err(_) => Err(ConnectError::Descriptors("sent after the reply")),
            };
        }
    }

    /// Polls and waits on [`fd`](Self::fd) until the reply is complete or
    /// the deadline passes, then [`finish`](Self::finish)es.
    pub(super) fn complete(mut self) -> Result<ClientChannel, ConnectError> {
        loop {
            if self.poll()? {
                return self.finish();
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            let fd = self.fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let ts = Timespec::try_from(left).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
            match poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(ConnectError::Io(e.into())),
            }
        }
    }

    /// Validates the server's reply and descriptors and sets the connection
    /// up (no waiting: everything arrived).
    ///
    /// # Errors
    ///
    /// As [`ClientChannel::connect`]; `Timeout`-free. Calling it before
    /// [`poll`](Self::poll) returned `true` fails with a decode error.
    pub fn finish(self) -> Result<ClientChannel, ConnectError> {
        if self.got < REPLY_LEN {
            return Err(ConnectError::Handshake(HandshakeDecodeError::WrongLength {
                expected: REPLY_LEN,
                actual: self.got,
            }));
        }
        ClientChannel::finish(self.stream, &self.reply, self.fds)
    }
}
