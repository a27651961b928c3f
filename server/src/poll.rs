//! The abstracted poll system: the server owns no event loop.
//!
//! The application's loop implements [`Poller`]; the server registers its
//! file descriptors through it, each with a [`Token`], and the application
//! calls [`Server::handle_event`](crate::Server::handle_event) with the
//! token of every descriptor that became readable, and
//! [`Server::tick`](crate::Server::tick) every few tens of milliseconds
//! (timeouts, retried disconnect callbacks). Interest is always
//! "readable". It is level-triggered ([`Poller::register`]), which fits
//! `poll(2)`, `epoll`, `mio` and the like, except for the per-connection
//! request eventfds, which the server offers edge-triggered
//! ([`Poller::register_edge`]: a loop that supports it saves one `read` per
//! wake-up; the default falls back to level-triggered and the server then
//! drains them). [`EpollPoller`] is the built-in implementation behind
//! [`Server::run`](crate::Server::run), and supports both.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::epoll;
use rustix::event::Timespec;

/// Identifies a registered descriptor to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// What the server needs from an event loop.
#[doc(alias = "coroipcs_init_state")]
pub trait Poller {
    /// Starts watching `fd` for readability (and hang-up), reporting it as
    /// `token`.
    ///
    /// # Errors
    ///
    /// Whatever the loop's registration fails with.
    fn register(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()>;

    /// Changes the token of a registered `fd`.
    ///
    /// # Errors
    ///
    /// Whatever the loop's modification fails with.
    fn modify(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()>;

    /// Like [`register`](Self::register), but edge-triggered if the loop
    /// supports it; returns whether it did. The server registers the
    /// per-connection request eventfds this way: edge-triggered, it need
    /// not drain them (one `read` less per wake-up). The default registers
    /// level-triggered and returns `false`.
    ///
    /// # Errors
    ///
    /// Whatever the loop's registration fails with.
    fn register_edge(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<bool> {
        self.register(fd, token).map(|()| false)
    }

    /// Stops watching `fd`. Called before the server closes it.
    ///
    /// # Errors
    ///
    /// Whatever the loop's removal fails with.
    fn deregister(&mut self, fd: BorrowedFd<'_>) -> io::Result<()>;
}

/// The built-in poller: epoll, level-triggered except where the server
/// asks for edge-triggered interest ([`Poller::register_edge`]).
pub struct EpollPoller {
    epoll: OwnedFd,
    events: Vec<epoll::Event>,
}

impl EpollPoller {
    /// Creates an epoll instance.
    ///
    /// # Errors
    ///
    /// The `epoll_create1(2)` error.
    pub fn new() -> io::Result<Self> {
        Ok(Self { epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?, events: Vec::with_capacity(256) })
    }

    /// The epoll instance, to move to another thread (`Event` buffers are
    /// not `Send`); rebuild the poller there with [`from_fd`](Self::from_fd).
    pub(crate) fn into_fd(self) -> OwnedFd {
        self.epoll
    }

    /// A poller over an existing epoll instance.
    pub(crate) fn from_fd(epoll: OwnedFd) -> Self {
        Self { epoll, events: Vec::with_capacity(256) }
    }

    /// Waits up to `timeout` (`None`: forever) and appends the tokens of
    /// ready descriptors to `ready`.
    ///
    /// # Errors
    ///
    /// The `epoll_wait(2)` error other than `EINTR`.
    pub fn wait(&mut self, ready: &mut Vec<Token>, timeout: Option<Duration>) -> io::Result<()> {
        self.events.clear();
        let ts = timeout.map(|d| Timespec::try_from(d).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 }));
        match epoll::wait(&self.epoll, spare_capacity(&mut self.events), ts.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        ready.extend(self.events.iter().map(|e| Token(e.data.u64())));
        Ok(())
    }
}

impl std::fmt::Debug for EpollPoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpollPoller").field("epoll", &self.epoll).finish_non_exhaustive()
    }
}

impl AsFd for EpollPoller {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl Poller for EpollPoller {
    fn register(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token.0), flags)?;
        Ok(())
    }

    fn register_edge(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<bool> {
        // Every eventfd write wakes its waiters, so an edge-triggered epoll
        // reports each one: nothing is lost by not draining.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
        epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token.0), flags)?;
        Ok(true)
    }

    fn modify(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        epoll::modify(&self.epoll, fd, epoll::EventData::new_u64(token.0), flags)?;
        Ok(())
    }

    fn deregister(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        epoll::delete(&self.epoll, fd)?;
        Ok(())
    }
}
