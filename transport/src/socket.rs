//! Unix stream socket rendezvous: endpoints, listening, and passing file
//! descriptors.
//!
//! The socket carries only the connection set-up: the client's hello, the
//! server's reply with the segment memfd and wake-up descriptors attached
//! (`SCM_RIGHTS`), and afterwards serves as the liveness signal (a hang-up
//! means the peer is gone). Every message after that travels through shared
//! memory.
//!
//! - [`Endpoint`]: where a server listens, a filesystem path or a Linux
//!   abstract name (`"@name"`), which leaves nothing on disk.
//! - [`Listener`]: bound, listening, nonblocking; replaces a *stale* socket
//!   file left by a dead server but never one a live server listens on, and
//!   removes its own socket file on drop.
//! - [`Stream`]: a connected socket, with [`send_with_fds`] /
//!   [`recv_with_fds`] and the peer's kernel-given credentials
//!   ([`peer_credentials`]).
//!
//! Received descriptors are always close-on-exec (`MSG_CMSG_CLOEXEC`), and a
//! message with more descriptors than were asked for is an error, not a
//! silent loss.
//!
//! **Peer-supplied descriptors are never closed inline.** The last close of
//! a descriptor can block: a TCP socket with `SO_LINGER` and unsent data
//! waits up to its linger time in `close(2)`. A peer that passes such a
//! socket could otherwise freeze whichever thread drops it — the server's
//! event loop, or a client past its deadline. So:
//!
//! - a [`Listener`] refuses descriptors altogether (`SO_PASSRIGHTS` off,
//!   Linux 6.16 and later; inherited by every accepted socket from the
//!   moment the peer connects): the sender gets `EPERM`, nothing arrives;
//! - every receive ([`recv_with_fds`]) has room for the most descriptors a
//!   message can carry, so the kernel never drops some itself, and the
//!   unwanted ones go to [`close_in_background`], a dedicated closer thread;
//! - where the kernel cannot refuse descriptors, a socket that may still
//!   hold some queued is released with [`release_in_background`].

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, OnceLock};

use rustix::io::Errno;
use rustix::net::{
    connect, recvmsg, send, sendmsg, socket_with, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage,
    RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

use crate::peercred::set_pass_rights;
pub use crate::peercred::{peer_credentials, PeerCred};

/// The most descriptors one message may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// The longest path or abstract name a Unix socket address can hold
/// (`sun_path` is 108 bytes, one of which is the terminating or leading NUL).
pub const MAX_ENDPOINT_LEN: usize = 107;

/// Where a server listens and a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A socket file in the filesystem; access is governed by the file's
    /// and its directories' permissions.
    Path(PathBuf),
    /// A Linux abstract socket name (without the leading NUL byte): nothing
    /// on disk, gone when the listener closes, scoped to the network
    /// namespace, and reachable by every process in it (authentication then
    /// rests entirely on the peer credentials).
    Abstract(Vec<u8>),
}

impl Endpoint {
    /// Parses `"@name"` as [`Endpoint::Abstract`] and anything else as
    /// [`Endpoint::Path`].
    ///
    /// # Errors
    ///
    /// [`EndpointParseError`] when the name is empty, contains a NUL byte,
    /// or is longer than [`MAX_ENDPOINT_LEN`] bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroipc_transport::socket::Endpoint;
    ///
    /// assert_eq!(Endpoint::parse("@corosync.ipc")?, Endpoint::Abstract(b"corosync.ipc".to_vec()));
    /// assert_eq!(Endpoint::parse("/run/cpg.sock")?, Endpoint::Path("/run/cpg.sock".into()));
    /// # Ok::<(), coroipc_transport::socket::EndpointParseError>(())
    /// ```
    pub fn parse(s: &str) -> Result<Self, EndpointParseError> {
        let (endpoint, name) = match s.strip_prefix('@') {
            Some(name) => (Endpoint::Abstract(name.as_bytes().to_vec()), name),
            None => (Endpoint::Path(PathBuf::from(s)), s),
        };
        if name.is_empty() {
            return Err(EndpointParseError::Empty);
        }
        if name.contains('\0') {
            return Err(EndpointParseError::ContainsNul);
        }
        if name.len() > MAX_ENDPOINT_LEN {
            return Err(EndpointParseError::TooLong { len: name.len() });
        }
        Ok(endpoint)
    }

    /// The `sockaddr_un` for this endpoint.
    fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Endpoint::Path(path) => SocketAddr::from_pathname(path),
            Endpoint::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::parse(s)
    }
}

impl fmt::Display for Endpoint {
    /// The inverse of [`Endpoint::parse`] for valid UTF-8 names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Path(path) => write!(f, "{}", path.display()),
            Endpoint::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// Why a string is not a valid [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointParseError {
    /// The path or abstract name is empty.
    Empty,
    /// The path or abstract name contains a NUL byte.
    ContainsNul,
    /// The path or abstract name is longer than [`MAX_ENDPOINT_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
}

impl fmt::Display for EndpointParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("empty endpoint"),
            Self::ContainsNul => f.write_str("endpoint contains a nul byte"),
            Self::TooLong { len } => {
                write!(f, "endpoint is {len} bytes, at most {MAX_ENDPOINT_LEN} fit")
            }
        }
    }
}

impl std::error::Error for EndpointParseError {}

/// A listening Unix stream socket in nonblocking mode.
///
/// For a [`Endpoint::Path`] the socket file is removed when the listener is
/// dropped, but only if the path still names the very socket this listener
/// created (same device and inode), so a listener never deletes another
/// server's socket.
///
/// # Examples
///
/// ```
/// use coroipc_transport::socket::{Endpoint, Listener, Stream};
///
/// // An abstract name (`@…`): nothing on disk.
/// let endpoint = Endpoint::parse(&format!("@coroipc-doc-listener-{}", std::process::id()))?;
/// let listener = Listener::bind(&endpoint)?;
/// assert!(listener.try_accept()?.is_none()); // nonblocking: nobody yet
///
/// let client = Stream::connect(&endpoint)?;
/// let server_side = listener.try_accept()?.expect("the connect is queued");
///
/// // Each side learns who the other is from the kernel.
/// let me = client.peer_credentials()?;
/// assert_eq!(server_side.peer_credentials()?.pid, Some(std::process::id()));
/// assert_eq!(me.uid, server_side.peer_credentials()?.uid);
///
/// // A second server on the same name is refused.
/// let err = Listener::bind(&endpoint).unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    endpoint: Endpoint,
    /// The absolute path and (device, inode) of our socket file, for
    /// unlinking on drop; `None` for abstract endpoints.
    socket_file: Option<(PathBuf, u64, u64)>,
}

impl Listener {
    /// Binds and listens on `endpoint`, in nonblocking, close-on-exec mode,
    /// refusing descriptors from clients (`SO_PASSRIGHTS` off, where the
    /// kernel has it: see the [module docs](self)).
    ///
    /// If a path endpoint is taken by a socket file on which nothing
    /// listens (connecting is refused: its server died without cleaning
    /// up), the file is removed and the bind retried once. A file that is
    /// not a socket, or a socket a live server accepts on, is left alone.
    /// (Two servers starting on the same stale path at the same instant can
    /// still race; the loser gets `AddrInUse` or, rarely, removes the
    /// winner's fresh socket, as with every Unix-socket daemon.)
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::AddrInUse`] if a live server listens there, or the
    /// path is taken by something that is not a socket; otherwise the
    /// `socket`/`bind`/`listen` error (e.g. `EACCES`, `ENOENT` for a missing
    /// directory).
    pub fn bind(endpoint: &Endpoint) -> io::Result<Self> {
        Self::bind_with(endpoint, &PathPermissions::default())
    }

    /// [`bind`](Self::bind), giving a path endpoint's socket file the
    /// mode and owner in `permissions` **before** it listens: until then a
    /// `connect(2)` is refused, so no client ever reaches the socket under
    /// the permissions it was created with (the process umask's).
    ///
    /// The mode and owner are applied by path, between `bind(2)` and
    /// `listen(2)`: whoever can write the socket's directory could swap
    /// the file in between (as they could delete it at any time), so put
    /// the socket in a directory only the server's user can write.
    ///
    /// # Errors
    ///
    /// As [`bind`](Self::bind), plus [`io::ErrorKind::InvalidInput`] for
    /// permissions on an abstract endpoint (abstract names have none), and
    /// the `chmod(2)`/`chown(2)` error (`EPERM` to give the file away
    /// without privilege); the socket file is removed again then.
    pub fn bind_with(endpoint: &Endpoint, permissions: &PathPermissions) -> io::Result<Self> {
        let (inner, socket_file) = match endpoint {
            Endpoint::Abstract(_) => {
                if *permissions != PathPermissions::default() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "abstract socket names have no mode or owner",
                    ));
                }
                (UnixListener::bind_addr(&endpoint.socket_addr()?)?, None)
            }
            Endpoint::Path(path) => {
                let path = std::path::absolute(path)?;
                let inner = match bind_path(&path, permissions) {
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse && is_stale_socket(&path) => {
                        std::fs::remove_file(&path)?;
                        bind_path(&path, permissions)?
                    }
                    other => other?,
                };
                let meta = std::fs::symlink_metadata(&path)?;
                (inner, Some((path, meta.dev(), meta.ino())))
            }
        };
        inner.set_nonblocking(true)?;
        refuse_descriptors(&inner)?;
        Ok(Self { inner, endpoint: endpoint.clone(), socket_file })
    }

    /// Accepts one pending connection without blocking; `Ok(None)` if none
    /// is pending.
    ///
    /// The returned [`Stream`] is close-on-exec and in **blocking** mode;
    /// give it timeouts (or make it nonblocking) before reading from an
    /// untrusted client.
    ///
    /// # Errors
    ///
    /// The `accept4(2)` error, e.g. `EMFILE` when out of descriptors.
    /// `EINTR` and `ECONNABORTED` (a client that gave up while queued) are
    /// retried.
    #[doc(alias = "coroipcs_handler_accept")]
    pub fn try_accept(&self) -> io::Result<Option<Stream>> {
        loop {
            match self.inner.accept() {
                Ok((stream, _addr)) => {
                    // Inherited from the listener already; set again in case
                    // the kernel did not copy it (a failure here changes
                    // nothing: `recv_with_fds` still hands descriptors to
                    // the closer thread).
                    let _ = refuse_descriptors(&stream);
                    return Ok(Some(Stream { inner: stream }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The endpoint this listener was bound to (as given, not made
    /// absolute).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl AsFd for Listener {
    /// The listening socket, readable when a connection is pending; hand it
    /// to the application's poll loop.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.socket_file {
            let ours =
                std::fs::symlink_metadata(path).map(|m| m.dev() == *dev && m.ino() == *ino).unwrap_or(false);
            if ours {
                // Nothing useful to do on failure in drop.
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The mode and owner of a path endpoint's socket file
/// ([`Listener::bind_with`]); `None` fields are left as `bind(2)` made
/// them (mode from the umask, owner the server's user).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PathPermissions {
    /// Permission bits (e.g. `0o660`: owner and group may connect; connect
    /// needs write permission on the socket file).
    pub mode: Option<u32>,
    /// The owning user.
    pub uid: Option<u32>,
    /// The owning group.
    pub gid: Option<u32>,
}

/// Binds a path socket, applies `permissions` to its file, then listens.
fn bind_path(path: &Path, permissions: &PathPermissions) -> io::Result<UnixListener> {
    use rustix::fs::{chmod, chownat, AtFlags, Gid, Mode, Uid, CWD};
    let fd = socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    let applied = (|| -> io::Result<()> {
        if permissions.uid.is_some() || permissions.gid.is_some() {
            // Not following a symlink someone put in the socket's place.
            chownat(
                CWD,
                path,
                permissions.uid.map(Uid::from_raw),
                permissions.gid.map(Gid::from_raw),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        if let Some(mode) = permissions.mode {
            chmod(path, Mode::from_raw_mode(mode))?;
        }
        rustix::net::listen(&fd, 128)?;
        Ok(())
    })();
    if let Err(e) = applied {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Whether `path` is a socket file on which nobody listens.
///
/// The probe connects without blocking: a live server whose accept backlog
/// is full answers `EAGAIN` (live, not stale) instead of stalling our bind.
fn is_stale_socket(path: &Path) -> bool {
    let is_socket = std::fs::symlink_metadata(path).map(|m| m.file_type().is_socket()).unwrap_or(false);
    if !is_socket {
        return false;
    }
    let Ok(addr) = SocketAddrUnix::new(path) else {
        return false;
    };
    let Ok(probe) = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    ) else {
        return false;
    };
    connect(&probe, &addr) == Err(Errno::CONNREFUSED)
}

/// A connected Unix stream socket (close-on-exec).
///
/// # Examples
///
/// Bytes and descriptors travel together; the receiver says how many
/// descriptors it accepts, and gets them close-on-exec.
///
/// ```
/// use coroipc_transport::eventfd::EventFd;
/// use coroipc_transport::socket::Stream;
/// use std::os::fd::AsFd;
///
/// let (a, b) = Stream::pair()?;
/// let bell = EventFd::new()?;
/// a.send_with_fds(b"bell", &[bell.as_fd()])?;
///
/// let mut buf = [0u8; 4];
/// let mut fds = b.recv_exact_with_fds(&mut buf, 1)?;
/// assert_eq!(&buf, b"bell");
/// let received = EventFd::from_fd(fds.remove(0))?;
/// bell.signal(); // the same eventfd, seen through both descriptors
/// assert_eq!(received.drain(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Stream {
    inner: UnixStream,
}

impl Stream {
    /// Connects to a server's endpoint. The stream is in blocking mode.
    ///
    /// Note that `connect(2)` on a Unix stream socket blocks, without a
    /// bound, while the server's accept backlog is full; use
    /// [`connect_nonblocking`](Self::connect_nonblocking) when a deadline
    /// matters (the handshake in [`crate::channel`] does).
    ///
    /// # Errors
    ///
    /// The `connect(2)` error: `ECONNREFUSED` (nobody listens), `ENOENT`
    /// (no such path), `EACCES`, …
    #[doc(alias = "coroipcc_service_connect")]
    pub fn connect(endpoint: &Endpoint) -> io::Result<Self> {
        let inner = match endpoint {
            Endpoint::Path(path) => UnixStream::connect(path)?,
            Endpoint::Abstract(_) => UnixStream::connect_addr(&endpoint.socket_addr()?)?,
        };
        Ok(Self { inner })
    }

    /// Starts connecting to a server's endpoint without blocking: the
    /// socket is nonblocking and close-on-exec from the start, and the
    /// boolean says whether the connection is established (`true`) or the
    /// server's accept backlog is full (`false`: nothing is queued; call
    /// [`retry_connect`](Self::retry_connect) later, the kernel offers no
    /// readiness event for "the backlog has room").
    ///
    /// # Errors
    ///
    /// The `socket(2)`/`connect(2)` error: `ECONNREFUSED` (nobody listens),
    /// `ENOENT` (no such path), `EACCES`, …
    #[doc(alias = "coroipcc_service_connect")]
    pub fn connect_nonblocking(endpoint: &Endpoint) -> io::Result<(Self, bool)> {
        let fd = socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        let stream = Self { inner: UnixStream::from(fd) };
        let connected = stream.retry_connect(endpoint)?;
        Ok((stream, connected))
    }

    /// Tries again to connect a socket from
    /// [`connect_nonblocking`](Self::connect_nonblocking) whose server had
    /// a full backlog; never blocks. `true` once connected (also if it
    /// already was).
    ///
    /// # Errors
    ///
    /// As [`connect_nonblocking`](Self::connect_nonblocking).
    pub fn retry_connect(&self, endpoint: &Endpoint) -> io::Result<bool> {
        let addr = match endpoint {
            Endpoint::Path(path) => SocketAddrUnix::new(path.as_path())?,
            Endpoint::Abstract(name) => SocketAddrUnix::new_abstract_name(name)?,
        };
        loop {
            return match connect(&self.inner, &addr) {
                Ok(()) | Err(Errno::ISCONN) => Ok(true),
                // A full backlog (`EAGAIN`); `EINPROGRESS`/`EALREADY` are
                // what other socket families answer for a connect under
                // way, which a later call completes (`EISCONN`) or fails.
                Err(Errno::AGAIN | Errno::INPROGRESS | Errno::ALREADY) => Ok(false),
                Err(Errno::INTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// A connected pair, as from `socketpair(2)` (for tests and in-process
    /// use).
    ///
    /// # Errors
    ///
    /// The `socketpair(2)` error.
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Self { inner: a }, Self { inner: b }))
    }

    /// The peer's credentials, from the kernel ([`peer_credentials`]).
    ///
    /// # Errors
    ///
    /// The `getsockopt(2)` error.
    pub fn peer_credentials(&self) -> io::Result<PeerCred> {
        peer_credentials(&self.inner)
    }

    /// Sends all of `bytes`, with `fds` attached to the first byte
    /// ([`send_with_fds`]).
    ///
    /// # Errors
    ///
    /// As [`send_with_fds`].
    pub fn send_with_fds(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        send_with_fds(&self.inner, bytes, fds)
    }

    /// Receives once, accepting up to `max_fds` descriptors
    /// ([`recv_with_fds`]).
    ///
    /// # Errors
    ///
    /// As [`recv_with_fds`].
    pub fn recv_with_fds(
        &self,
        buf: &mut [u8],
        max_fds: usize,
    ) -> Result<(usize, Vec<OwnedFd>), SocketRecvError> {
        recv_with_fds(&self.inner, buf, max_fds)
    }

    /// Fills `buf` completely, accepting up to `max_fds` descriptors in
    /// total ([`recv_exact_with_fds`]).
    ///
    /// # Errors
    ///
    /// As [`recv_exact_with_fds`].
    pub fn recv_exact_with_fds(
        &self,
        buf: &mut [u8],
        max_fds: usize,
    ) -> Result<Vec<OwnedFd>, SocketRecvError> {
        recv_exact_with_fds(&self.inner, buf, max_fds)
    }

    /// The standard-library stream, for timeouts, nonblocking mode,
    /// `shutdown` and plain reads and writes.
    pub fn as_std(&self) -> &UnixStream {
        &self.inner
    }

    /// Unwraps the standard-library stream.
    pub fn into_std(self) -> UnixStream {
        self.inner
    }
}

impl From<UnixStream> for Stream {
    fn from(inner: UnixStream) -> Self {
        Self { inner }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// Sends all of `bytes` on a connected stream socket, with `fds` attached
/// (`SCM_RIGHTS`) to the first chunk the kernel accepts.
///
/// Uses `MSG_NOSIGNAL`: a closed peer is an `EPIPE` error, not a `SIGPIPE`.
/// If the kernel takes only part of `bytes`, the rest is sent without
/// descriptors. On a nonblocking socket a full send buffer midway is a
/// `WouldBlock` error after part of the message went out, which leaves the
/// stream unusable for framing; use it in blocking mode with a write
/// timeout.
///
/// # Errors
///
/// - [`io::ErrorKind::InvalidInput`] if `fds` is non-empty but `bytes` is
///   empty (a stream socket needs at least one byte to carry them), or if
///   more than [`MAX_FDS_PER_MESSAGE`] descriptors are given.
/// - The `sendmsg(2)`/`send(2)` error (`EPIPE`, `EAGAIN`, …); `EINTR` is
///   retried.
pub fn send_with_fds(sock: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many file descriptors for one message"));
    }
    if bytes.is_empty() {
        return if fds.is_empty() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "file descriptors need at least one byte to travel with",
            ))
        };
    }
    let mut space = if fds.is_empty() {
        Vec::new()
    } else {
        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))]
    };
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        let pushed = control.push(SendAncillaryMessage::ScmRights(fds));
        debug_assert!(pushed, "control buffer sized by cmsg_space! fits");
    }
    let mut sent = loop {
        match sendmsg(&sock, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    while sent < bytes.len() {
        match send(&sock, &bytes[sent..], SendFlags::NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives once from a stream socket into `buf`, accepting at most
/// `max_fds` descriptors (capped at [`MAX_FDS_PER_MESSAGE`]).
///
/// Returns the number of bytes read (0 at end of stream, or if `buf` is
/// empty) and the descriptors that arrived with them, close-on-exec
/// (`MSG_CMSG_CLOEXEC`). Other ancillary data (e.g. `SCM_CREDENTIALS`) is
/// ignored. Like `recv(2)` it may return fewer bytes than were sent.
///
/// # Errors
///
/// - [`SocketRecvError::TooManyFds`] if more than `max_fds` arrived (the
///   control buffer has room for [`MAX_FDS_PER_MESSAGE`], so the kernel
///   itself drops none), and [`SocketRecvError::ControlTruncated`] if the
///   kernel truncated the control data anyway (`MSG_CTRUNC`). In both
///   cases every descriptor that did arrive goes to the closer thread
///   ([`close_in_background`]: its close may block), and the bytes read are
///   lost: treat the stream as broken.
/// - [`SocketRecvError::Io`] for the `recvmsg(2)` error (`EAGAIN` on a
///   nonblocking socket, `ECONNRESET`, …); `EINTR` is retried.
pub fn recv_with_fds(
    sock: impl AsFd,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<(usize, Vec<OwnedFd>), SocketRecvError> {
    let max_fds = max_fds.min(MAX_FDS_PER_MESSAGE);
    // Room for every descriptor one message can carry: a short control
    // buffer would make the kernel close the rest itself, in this thread.
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match recvmsg(&sock, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(msg) => break msg,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(SocketRecvError::Io(e.into())),
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        fds.into_iter().for_each(close_in_background);
        return Err(SocketRecvError::ControlTruncated);
    }
    if fds.len() > max_fds {
        fds.into_iter().for_each(close_in_background);
        return Err(SocketRecvError::TooManyFds { max: max_fds });
    }
    Ok((msg.bytes, fds))
}

/// Receives until `buf` is full, accepting at most `max_fds` descriptors
/// across all the reads it takes; returns the descriptors.
///
/// Meant for blocking sockets (with a read timeout when the peer is
/// untrusted): on a nonblocking socket an `EAGAIN` midway is an error
/// after part of `buf` was consumed.
///
/// # Errors
///
/// As [`recv_with_fds`], plus [`SocketRecvError::Io`] with
/// [`io::ErrorKind::UnexpectedEof`] if the stream ends before `buf` is
/// full. Descriptors received before an error are closed on the closer
/// thread ([`close_in_background`]).
pub fn recv_exact_with_fds(
    sock: impl AsFd,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<Vec<OwnedFd>, SocketRecvError> {
    let max_fds = max_fds.min(MAX_FDS_PER_MESSAGE);
    let mut fds = Vec::new();
    let mut filled = 0;
    while filled < buf.len() {
        let (n, more) = match recv_with_fds(sock.as_fd(), &mut buf[filled..], max_fds - fds.len()) {
            Ok(got) => got,
            Err(e) => {
                fds.into_iter().for_each(close_in_background);
                return Err(e);
            }
        };
        fds.extend(more);
        if n == 0 {
            fds.into_iter().for_each(close_in_background);
            return Err(SocketRecvError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        filled += n;
    }
    Ok(fds)
}

/// Closes `fd` on the crate's closer thread, never in the caller's: for
/// descriptors a peer sent, whose last close may block (a lingering TCP
/// socket waits in `close(2)` up to its `SO_LINGER` time). The thread is
/// started on first use and closes descriptors one by one, in order; if it
/// cannot be started, `fd` is closed here.
pub fn close_in_background(fd: OwnedFd) {
    static CLOSER: OnceLock<Option<mpsc::Sender<OwnedFd>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<OwnedFd>();
        std::thread::Builder::new()
            .name("coroipc-closer".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    match closer {
        // The receiver lives as long as the process; a failed send hands
        // the descriptor back, closed here.
        Some(tx) => {
            if let Err(mpsc::SendError(fd)) = tx.send(fd) {
                drop(fd);
            }
        }
        None => drop(fd),
    }
}

/// Whether every listener so far could refuse descriptors
/// (`SO_PASSRIGHTS`): then no socket it accepted can hold a peer's
/// descriptor, and none needs [`release_in_background`].
static PASS_RIGHTS_REFUSED: AtomicBool = AtomicBool::new(true);

/// Refuses descriptors on `sock`; records a kernel without the option.
fn refuse_descriptors(sock: impl AsFd) -> io::Result<()> {
    if !set_pass_rights(sock, false)? {
        PASS_RIGHTS_REFUSED.store(false, Ordering::Relaxed);
    }
    Ok(())
}

/// Stops `sock` from receiving descriptors from now on (`SO_PASSRIGHTS`
/// off, Linux 6.16 and later); `Ok(false)` if the kernel cannot.
/// Descriptors already queued stay queued.
///
/// # Errors
///
/// The `setsockopt(2)` error, other than "unknown option".
pub fn stop_descriptors(sock: impl AsFd) -> io::Result<bool> {
    set_pass_rights(sock, false)
}

/// Makes sure the **last** close of the socket `sock` — which also drops
/// the descriptors the peer left queued in it, unread — happens on the
/// closer thread ([`close_in_background`]): hangs the socket up now
/// (`shutdown`, so the peer learns at once) and hands a duplicate to the
/// closer, so that the caller's own close is never the last.
///
/// With `accepted` set (a socket from a [`Listener`]) it does nothing when
/// the kernel refused descriptors to every listener: nothing can be queued.
pub fn release_in_background(sock: BorrowedFd<'_>, accepted: bool) {
    if accepted && PASS_RIGHTS_REFUSED.load(Ordering::Relaxed) {
        return;
    }
    let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Both);
    if let Ok(dup) = sock.try_clone_to_owned() {
        close_in_background(dup);
    }
}

/// Why [`recv_with_fds`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SocketRecvError {
    /// The kernel truncated the control data (`MSG_CTRUNC`): the peer sent
    /// more descriptors than were allowed.
    ControlTruncated,
    /// More descriptors than allowed arrived.
    TooManyFds {
        /// The number allowed.
        max: usize,
    },
    /// `recvmsg(2)` failed, or the stream ended early.
    Io(io::Error),
}

impl fmt::Display for SocketRecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ControlTruncated => f.write_str("control data truncated"),
            Self::TooManyFds { max } => {
                write!(f, "more than {max} file descriptors received")
            }
            Self::Io(_) => f.write_str("cannot receive from socket"),
        }
    }
}

impl std::error::Error for SocketRecvError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for SocketRecvError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<SocketRecvError> for io::Error {
    /// `Io` unwraps; the descriptor errors become
    /// [`io::ErrorKind::InvalidData`].
    fn from(e: SocketRecvError) -> Self {
        match e {
            SocketRecvError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The name of a unique abstract endpoint for tests in this crate.
#[cfg(test)]
pub(crate) fn unique_abstract_endpoint(tag: &str) -> Endpoint {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Endpoint::Abstract(format!("coroipc-test-{tag}-{}-{n}", std::process::id()).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventfd::EventFd;
    use crate::segment::Segment;
    use rustix::io::{fcntl_getfd, FdFlags};
    use std::ffi::OsStr;
    use std::io::{Read, Write};
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};

    /// A socket path in a fresh private directory, removed on drop.
    struct TempSock {
        dir: PathBuf,
        path: PathBuf,
    }

    impl TempSock {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("coroipc-socket-test-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("s.sock");
            Self { dir, path }
        }
    }

    impl Drop for TempSock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn accept_within(listener: &Listener, limit: Duration) -> Stream {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = listener.try_accept().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "no connection arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn parse_endpoints() {
        assert_eq!(Endpoint::parse("@name").unwrap(), Endpoint::Abstract(b"name".to_vec()));
        assert_eq!("/tmp/x.sock".parse::<Endpoint>().unwrap(), Endpoint::Path("/tmp/x.sock".into()));
        assert_eq!(Endpoint::parse("rel/x").unwrap(), Endpoint::Path("rel/x".into()));
        assert_eq!(Endpoint::parse(""), Err(EndpointParseError::Empty));
        assert_eq!(Endpoint::parse("@"), Err(EndpointParseError::Empty));
        assert_eq!(Endpoint::parse("a\0b"), Err(EndpointParseError::ContainsNul));
        assert_eq!(Endpoint::parse("@a\0b"), Err(EndpointParseError::ContainsNul));
        let long = "x".repeat(MAX_ENDPOINT_LEN + 1);
        assert_eq!(Endpoint::parse(&long), Err(EndpointParseError::TooLong { len: 108 }));
        assert!(Endpoint::parse(&format!("@{}", &long[1..])).is_ok());
    }

    #[test]
    fn display_round_trips() {
        for s in ["@abc", "/run/x.sock", "relative"] {
            assert_eq!(Endpoint::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn abstract_endpoint_connects_and_reports_credentials() {
        let ep = unique_abstract_endpoint("cred");
        let listener = Listener::bind(&ep).unwrap();
        assert!(listener.try_accept().unwrap().is_none());
        let client = Stream::connect(&ep).unwrap();
        let server = accept_within(&listener, Duration::from_secs(5));
        let cred = server.peer_credentials().unwrap();
        assert_eq!(cred.pid, Some(std::process::id()));
        assert_eq!(cred.uid, rustix::process::geteuid().as_raw());
        assert_eq!(client.peer_credentials().unwrap(), cred);
    }

    #[test]
    fn accepted_stream_is_cloexec() {
        let ep = unique_abstract_endpoint("cloexec");
        let listener = Listener::bind(&ep).unwrap();
        let _client = Stream::connect(&ep).unwrap();
        let server = accept_within(&listener, Duration::from_secs(5));
        assert!(fcntl_getfd(&server).unwrap().contains(FdFlags::CLOEXEC));
        assert!(fcntl_getfd(&listener).unwrap().contains(FdFlags::CLOEXEC));
    }

    #[test]
    fn path_listener_unlinks_on_drop() {
        let tmp = TempSock::new("unlink");
        let path = tmp.path.clone();
        let listener = Listener::bind(&Endpoint::Path(path.clone())).unwrap();
        assert!(path.exists());
        drop(listener);
        assert!(!path.exists());
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let tmp = TempSock::new("stale");
        let path = tmp.path.clone();
        // std's listener leaves its socket file behind: a dead server.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let ep = Endpoint::Path(path.clone());
        let listener = Listener::bind(&ep).unwrap();
        let mut client = Stream::connect(&ep).unwrap().into_std();
        let server = accept_within(&listener, Duration::from_secs(5));
        client.write_all(b"hi").unwrap();
        let mut buf = [0; 2];
        server.as_std().read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn live_socket_is_not_stolen() {
        let tmp = TempSock::new("live");
        let path = tmp.path.clone();
        let ep = Endpoint::Path(path.clone());
        let first = Listener::bind(&ep).unwrap();
        let err = Listener::bind(&ep).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // The first listener still works.
        let _client = Stream::connect(&ep).unwrap();
        accept_within(&first, Duration::from_secs(5));
    }

    #[test]
    fn live_socket_with_full_backlog_is_not_stolen_and_bind_does_not_hang() {
        let tmp = TempSock::new("backlog");
        let path = tmp.path.clone();
        // A live server that never accepts.
        let _live = UnixListener::bind(&path).unwrap();
        let addr = SocketAddrUnix::new(&path).unwrap();
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
            assert!(queued.len() < 100_000, "backlog never filled");
        }
        let start = Instant::now();
        let err = Listener::bind(&Endpoint::Path(path.clone())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(path.exists());
        drop(_live);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn regular_file_at_path_is_not_removed() {
        let tmp = TempSock::new("regular");
        let path = tmp.path.clone();
        std::fs::write(&path, b"precious").unwrap();
        let err = Listener::bind(&Endpoint::Path(path.clone())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn drop_does_not_remove_a_replacement_socket() {
        let tmp = TempSock::new("replaced");
        let path = tmp.path.clone();
        let ep = Endpoint::Path(path.clone());
        let old = Listener::bind(&ep).unwrap();
        std::fs::remove_file(&path).unwrap();
        let new = Listener::bind(&ep).unwrap();
        drop(old);
        assert!(path.exists(), "the old listener removed the new socket");
        drop(new);
        assert!(!path.exists());
    }

    #[test]
    fn path_endpoint_gets_its_mode_and_owner_before_it_listens() {
        let tmp = TempSock::new("mode");
        let ep = Endpoint::Path(tmp.path.clone());
        let root = rustix::process::geteuid().is_root();
        let permissions =
            PathPermissions { mode: Some(0o600), uid: root.then_some(65534), gid: root.then_some(65534) };
        let listener = Listener::bind_with(&ep, &permissions).unwrap();
        let meta = std::fs::symlink_metadata(&tmp.path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        if root {
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        }
        // It listens: a client connects.
        let _client = Stream::connect(&ep).unwrap();
        accept_within(&listener, Duration::from_secs(5));
        drop(listener);
        assert!(!tmp.path.exists());
    }

    #[test]
    fn abstract_endpoint_has_no_permissions_to_set() {
        let ep = unique_abstract_endpoint("perm");
        let permissions = PathPermissions { mode: Some(0o600), ..PathPermissions::default() };
        assert_eq!(Listener::bind_with(&ep, &permissions).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn abstract_endpoint_in_use_is_refused() {
        let ep = unique_abstract_endpoint("inuse");
        let _first = Listener::bind(&ep).unwrap();
        assert_eq!(Listener::bind(&ep).unwrap_err().kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn fds_travel_and_arrive_cloexec() {
        let (a, b) = Stream::pair().unwrap();
        let seg = Segment::create(4096).unwrap();
        let efd = EventFd::new().unwrap();
        a.send_with_fds(b"hello", &[seg.as_fd(), efd.as_fd()]).unwrap();
        let mut buf = [0u8; 5];
        let fds = b.recv_exact_with_fds(&mut buf, 2).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            assert!(fcntl_getfd(fd).unwrap().contains(FdFlags::CLOEXEC));
        }
        let mut fds = fds.into_iter();
        let seg2 = Segment::from_fd(fds.next().unwrap(), 4096).unwrap();
        let efd2 = EventFd::from_fd(fds.next().unwrap()).unwrap();
        seg.atomic_u32(0).store(42, std::sync::atomic::Ordering::Release);
        assert_eq!(seg2.atomic_u32(0).load(std::sync::atomic::Ordering::Acquire), 42);
        efd.signal();
        assert_eq!(efd2.drain(), 1);
    }

    #[test]
    fn bytes_without_fds_are_fine() {
        let (a, b) = Stream::pair().unwrap();
        a.send_with_fds(b"abc", &[]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = b.recv_with_fds(&mut buf, 4).unwrap();
        assert_eq!((n, fds.len()), (3, 0));
        assert_eq!(&buf[..3], b"abc");
    }

    #[test]
    fn fds_without_bytes_are_refused() {
        let (a, _b) = Stream::pair().unwrap();
        let efd = EventFd::new().unwrap();
        let err = a.send_with_fds(b"", &[efd.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn unexpected_fds_are_refused() {
        let (a, b) = Stream::pair().unwrap();
        let efd = EventFd::new().unwrap();
        a.send_with_fds(b"x", &[efd.as_fd()]).unwrap();
        let mut buf = [0u8; 1];
        let err = b.recv_with_fds(&mut buf, 0).unwrap_err();
        assert!(matches!(err, SocketRecvError::TooManyFds { max: 0 }), "{err:?}");
    }

    #[test]
    fn too_many_fds_are_refused() {
        let (a, b) = Stream::pair().unwrap();
        let efds: Vec<EventFd> = (0..8).map(|_| EventFd::new().unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = efds.iter().map(|e| e.as_fd()).collect();
        a.send_with_fds(b"x", &borrowed).unwrap();
        let mut buf = [0u8; 1];
        let err = b.recv_with_fds(&mut buf, 1).unwrap_err();
        assert!(
            matches!(err, SocketRecvError::ControlTruncated | SocketRecvError::TooManyFds { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn recv_exact_reports_early_eof() {
        let (a, b) = Stream::pair().unwrap();
        a.send_with_fds(b"ab", &[]).unwrap();
        drop(a);
        let mut buf = [0u8; 4];
        let err = b.recv_exact_with_fds(&mut buf, 0).unwrap_err();
        match err {
            SocketRecvError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn send_to_closed_peer_is_epipe_not_sigpipe() {
        let (a, b) = Stream::pair().unwrap();
        drop(b);
        let err = a.send_with_fds(b"x", &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn abstract_name_is_not_a_path() {
        let ep = unique_abstract_endpoint("nopath");
        let _l = Listener::bind(&ep).unwrap();
        if let Endpoint::Abstract(name) = &ep {
            assert!(!Path::new(OsStr::from_bytes(name)).exists());
        }
    }
}
