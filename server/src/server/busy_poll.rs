//! The built-in event loop ([`Server::run`], [`Server::spawn`]): a
//! busy-poll loop over epoll.
//!
//! Connections that had a request recently are *active*: the loop polls
//! them (one load of each request ring's tail) for the spin budget before
//! it sleeps, so a busy client never pays a kernel wake-up per request.
//! Only when no active connection had a request for the whole budget does
//! the loop *arm* them (announce itself as a poller on each request ring,
//! then re-check) and sleep in `epoll_wait`. Idle connections stay armed
//! and cost nothing. While busy, the loop still looks at epoll every
//! 200 µs, so accepts and other connections are not starved.

use std::io;
use std::time::{Duration, Instant};

use coroipc_transport::waiter::spin_until;

use super::{Server, ServerHandle};
use crate::connection::Connection;
use crate::poll::{EpollPoller, Poller};

/// Whether the loop can serve a request of `conn` now: one is waiting,
/// requests are not paused, and its response would fit (see `serve`). A
/// connection with requests it cannot serve yet (its client does not read
/// its responses, or its service is paused) must not count as ready: the
/// built-in loop would poll it without ever reaching `epoll_wait`, spinning
/// a core and starving accepts and every armed connection (found by
/// `reliability_hostile::clients_flooding_requests_and_never_reading_cannot_block_the_server_or_grow_it`).
/// `tick` retries such connections; a resume wakes the loop.
pub(super) fn servable(conn: &Connection) -> bool {
    let c = &conn.inner.channel;
    c.has_request() && !c.request_paused() && c.response_space_for(c.max_message())
}

/// Whether the polling loop should stop spinning for `conn`: it has work,
/// or its client closed the connection (then `serve` closes it at once,
/// instead of spinning out the budget on a dead connection and noticing
/// the hang-up only through epoll — which delayed every `connect` cycle by
/// the spin budget).
fn needs_attention(conn: &Connection) -> bool {
    servable(conn) || conn.inner.channel.peer_closed()
}

impl Server {
    /// Serves the active connections (those that had requests recently)
    /// without sleeping: polls them for up to the spin budget, returns as
    /// soon as one had requests. Returns whether anything was served.
    fn poll_active(&mut self, poller: &mut dyn Poller) -> bool {
        if self.active.is_empty() {
            return false;
        }
        // Taken out (not cloned: no allocation per poll) and put back; a
        // connection `serve` closes meanwhile is skipped by every later use.
        let mut active = std::mem::take(&mut self.active);
        let conns = &self.conns;
        let mut ready = || active.iter().any(|id| conns.get(id).is_some_and(|e| needs_attention(&e.conn)));
        if !spin_until(&mut ready, self.spin) {
            self.active = active;
            return false;
        }
        let mut served = 0;
        for &id in &active {
            served += self.serve(id, poller);
        }
        active.retain(|id| self.conns.contains_key(id));
        active.append(&mut self.active);
        self.active = active;
        served > 0
    }

    /// Arms every active connection (announces that the loop will sleep in
    /// epoll); returns `true` if a request arrived meanwhile, in which case
    /// the loop must not sleep.
    fn arm_active(&mut self) -> bool {
        let mut raced = false;
        for id in std::mem::take(&mut self.active) {
            if let Some(e) = self.conns.get_mut(&id) {
                if e.conn.inner.channel.arm_requests() && servable(&e.conn) {
                    // A request arrived before the announcement, so its
                    // client rang nobody: keep polling this connection, or
                    // the request would wait for the next tick (10 ms).
                    raced = true;
                    self.active.push(id);
                }
                e.armed = true;
            }
        }
        raced
    }

    /// Runs the built-in event loop (epoll) until
    /// [`ServerHandle::shutdown`].
    ///
    /// Between two requests of a busy client the loop does not sleep: it
    /// polls the connections that were active for the spin budget, and only
    /// then arms their eventfds and sleeps in `epoll_wait` (ARCHITECTURE.md
    /// explains the choice and its measurements).
    ///
    /// # Errors
    ///
    /// An error of the epoll instance itself.
    pub fn run(mut self) -> io::Result<()> {
        let mut poller = EpollPoller::new()?;
        self.register(&mut poller)?;
        self.run_with(poller)
    }

    /// The built-in loop on an epoll instance the server is registered with.
    fn run_with(mut self, mut poller: EpollPoller) -> io::Result<()> {
        self.builtin_loop = true;
        let mut ready = Vec::with_capacity(64);
        let mut last_tick = Instant::now();
        let mut last_epoll = Instant::now();
        const TICK: Duration = Duration::from_millis(10);
        while !self.stopped {
            if self.poll_active(&mut poller) {
                // Busy: look at other descriptors now and then, not per request.
                if last_epoll.elapsed() < Duration::from_micros(200) {
                    continue;
                }
                last_epoll = Instant::now();
                poller.wait(&mut ready, Some(Duration::ZERO))?;
            } else if self.arm_active() {
                continue;
            } else {
                poller.wait(&mut ready, Some(TICK))?;
                last_epoll = Instant::now();
            }
            for token in ready.drain(..) {
                self.handle_event(token, &mut poller);
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick(&mut poller);
            }
        }
        Ok(())
    }

    /// Starts [`run`](Self::run) on a new thread; returns a handle and the
    /// thread's join handle.
    ///
    /// # Errors
    ///
    /// The thread spawn error.
    pub fn spawn(mut self) -> io::Result<(ServerHandle, std::thread::JoinHandle<io::Result<()>>)> {
        let handle = self.handle();
        // Set the loop up here, so every descriptor it needs exists (and a
        // failure is reported) before `spawn` returns.
        let mut poller = EpollPoller::new()?;
        self.register(&mut poller)?;
        let epoll = poller.into_fd();
        let join = std::thread::Builder::new()
            .name("coroipc-server".into())
            .spawn(move || self.run_with(EpollPoller::from_fd(epoll)))?;
        Ok((handle, join))
    }
}
