//! Admission: from an accepted socket to a connection.
//!
//! **Invariant: nothing is created before authentication.** A client that
//! connects costs the server one socket and a handshake-in-progress entry
//! (bounded in number by `max_pending_handshakes`, the oldest dropped, and
//! in time by the handshake timeout) until its hello has arrived and passed
//! every check that needs no memory, in this order
//! ([`Server::advance_handshake`]):
//!
//! 1. the hello decodes (else "invalid" or "version mismatch");
//! 2. [`admit`](Server::admit): the service exists, the server's and the
//!    service's connection limits have room, and the authentication
//!    callback accepts the peer's kernel credentials (`SO_PEERCRED`; a
//!    panicking callback refuses);
//! 3. the negotiated ring sizes are within the limits, and the segment
//!    fits the memory budget in all and for the peer's uid;
//! 4. the descriptor reserve can be refilled (else the process is at its
//!    descriptor limit: "connection limit").
//!
//! Only then does `PendingHandshake::accept` create the segment and the
//! eventfds, and only then does the service's connect callback run. A
//! refused client is told why (a typed [`Refusal`]) and costs nothing more.
//!
//! Out of descriptors, `accept` itself fails: the reserve-descriptor trick
//! ([`Server::refuse_without_descriptors`]) still tells waiting clients
//! "connection limit" instead of leaving them to time out.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coroipc_transport::channel::{layout_for, negotiate, PendingHandshake};
use coroipc_transport::eventfd::EventFd;
use coroipc_transport::handshake::{HandshakeDecodeError, Refusal, ServerReply};

use super::{lock, Entry, RawId, Server};
use crate::connection::Connection;
use crate::poll::{Poller, Token};
use crate::service::ServiceDyn;

/// Descriptors one connection holds in the server: its socket, its segment
/// memfd and three eventfds (request, response and dispatch bells).
pub(super) const FDS_PER_CONNECTION: u64 = 5;
/// Descriptors kept in reserve (placeholder eventfds): given back just
/// before a connection's memory and bells are made, so that making them
/// cannot fail for lack of descriptors, and before an `accept` that failed
/// with `EMFILE`, so that the waiting client can still be told "no".
pub(super) const RESERVE_FDS: usize = FDS_PER_CONNECTION as usize;
/// How long the listener is not watched after `accept` ran out of
/// descriptors (a level-triggered listener would wake the loop at once,
/// again and again).
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Clients refused through the reserve descriptor per wake-up while out of
/// descriptors, before the listener backs off.
const EMFILE_REFUSALS_PER_WAKE: usize = 64;

/// Placeholder descriptors held in reserve (see [`RESERVE_FDS`]).
#[derive(Default)]
pub(super) struct FdReserve {
    fds: Vec<EventFd>,
}

impl FdReserve {
    /// Takes descriptors back until the reserve is full; whether it is.
    pub(super) fn refill(&mut self) -> bool {
        while self.fds.len() < RESERVE_FDS {
            match EventFd::new() {
                Ok(fd) => self.fds.push(fd),
                Err(_) => return false,
            }
        }
        true
    }

    /// Gives every reserved descriptor back to the process.
    pub(super) fn release(&mut self) {
        self.fds.clear();
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    let errno = e.raw_os_error();
    errno == Some(rustix::io::Errno::MFILE.raw_os_error())
        || errno == Some(rustix::io::Errno::NFILE.raw_os_error())
}

impl Server {
    /// Accepts every queued client and starts its handshake (reading the
    /// hello at once if it is already there). At the handshake limit the
    /// oldest handshake in progress is dropped; out of descriptors, the
    /// waiting clients are refused through the reserve.
    pub(super) fn accept_all(&mut self, poller: &mut dyn Poller) {
        if self.listener_paused_until.is_some() {
            return; // a stale readiness report: `tick` resumes accepting
        }
        loop {
            let stream = match self.listener.try_accept() {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(e) if out_of_descriptors(&e) => {
                    self.refuse_without_descriptors(poller);
                    return;
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            if self.pending.len() >= self.max_pending {
                // The oldest handshake in progress makes room: a flood of
                // clients that never say hello cannot lock others out.
                if let Some(&oldest) = self.pending.iter().min_by_key(|(_, p)| p.started()).map(|(id, _)| id)
                {
                    if let Some(p) = self.pending.remove(&oldest) {
                        let _ = poller.deregister(p.stream().as_fd());
                        log::info!("dropping client {oldest}: too many handshakes in progress");
                    }
                }
            }
            let pending = match PendingHandshake::new(stream) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("handshake set-up failed: {e}");
                    continue;
                }
            };
            let id = self.next_id;
            self.next_id += 1;
            if let Err(e) = poller.register(pending.stream().as_fd(), Token(id)) {
                log::warn!("cannot register a new client: {e}");
                continue;
            }
            self.pending.insert(id, pending);
            // The hello may already be there.
            self.advance_handshake(id, poller);
        }
    }

    /// `accept` ran out of descriptors: the classic reserve-descriptor
    /// trick. Give the reserve back, accept the waiting clients with it one
    /// by one and tell each "connection limit" (a typed refusal, not a
    /// reset), take the reserve again; then stop watching the listener for
    /// [`ACCEPT_BACKOFF`], so that a queue the server cannot take does not
    /// wake the loop at once, again and again.
    #[cold]
    fn refuse_without_descriptors(&mut self, poller: &mut dyn Poller) {
        let mut refused = 0;
        while refused < EMFILE_REFUSALS_PER_WAKE {
            self.reserve.release();
            let accepted = self.listener.try_accept();
            let more = match accepted {
                Ok(Some(stream)) => {
                    let _ = stream.as_std().set_nonblocking(true);
                    let _ =
                        stream.send_with_fds(&ServerReply::Refused(Refusal::ConnectionLimit).encode(), &[]);
                    refused += 1;
                    true
                }
                _ => false,
            };
            let full = self.reserve.refill();
            if !more || !full {
                break;
            }
        }
        log::warn!("out of descriptors: refused {refused} clients; not accepting for {ACCEPT_BACKOFF:?}");
        let _ = poller.deregister(self.listener.as_fd());
        self.listener_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
    }

    /// Reads the hello of pending client `id`, if it has arrived, and
    /// takes the client through the admission checks (see the module docs)
    /// to a connection, or refuses it.
    pub(super) fn advance_handshake(&mut self, id: RawId, poller: &mut dyn Poller) {
        let Some(pending) = self.pending.get_mut(&id) else { return };
        let hello = match pending.poll_hello() {
            Ok(None) => return,
            Ok(Some(hello)) => hello,
            Err(e) => {
                log::info!("client {id} dropped during handshake: {e}");
                if let Some(p) = self.pending.remove(&id) {
                    let _ = poller.deregister(p.stream().as_fd());
                }
                return;
            }
        };
        let pending = self.pending.remove(&id).expect("present above");
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                let refusal = match e {
                    HandshakeDecodeError::UnsupportedVersion { .. } => Refusal::VersionMismatch,
                    _ => Refusal::Invalid,
                };
                log::info!("client {id} sent a bad hello: {e}");
                let _ = poller.deregister(pending.stream().as_fd());
                pending.refuse(refusal);
                return;
            }
        };
        let decision = self
            .admit(&pending, hello.service)
            .and_then(|service| negotiate(&hello.sizes, &self.limits).map(|sizes| (service, sizes)));
        let (service, sizes) = match decision {
            Ok(ok) => ok,
            Err(refusal) => {
                log::info!("client {id} refused: {refusal}");
                let _ = poller.deregister(pending.stream().as_fd());
                pending.refuse(refusal);
                return;
            }
        };
        let peer = pending.peer();
        let cost = layout_for(&sizes).segment_len;
        let uid_used = self.memory_by_uid.get(&peer.uid).copied().unwrap_or(0);
        if self.memory_used + cost > self.memory_budget || uid_used + cost > self.memory_per_uid {
            log::info!(
                "client {id} refused: {cost} bytes of rings exceed the memory budget \
                 ({} of {} used, uid {}: {uid_used} of {})",
                self.memory_used,
                self.memory_budget,
                peer.uid,
                self.memory_per_uid
            );
            let _ = poller.deregister(pending.stream().as_fd());
            pending.refuse(Refusal::NoMemory);
            return;
        }
        // The connection's descriptors come out of the reserve, so making
        // them cannot fail for lack of descriptors; a reserve that cannot
        // be filled again means the process is at its limit: refuse, typed.
        if !self.reserve.refill() {
            log::warn!("client {id} refused: out of descriptors");
            let _ = poller.deregister(pending.stream().as_fd());
            pending.refuse(Refusal::ConnectionLimit);
            return;
        }
        self.reserve.release();
        // `accept` consumes the stream and closes it on failure: deregister
        // it first (epoll would forget a closed fd by itself, a poll(2)
        // loop's list would not) and register it again on success.
        let _ = poller.deregister(pending.stream().as_fd());
        let accepted = pending.accept(sizes, &self.limits);
        self.reserve.refill();
        let channel = match accepted {
            Ok(c) => c,
            Err(e) => {
                log::warn!("client {id}: cannot set up the connection: {e}");
                return;
            }
        };
        self.memory_used += cost;
        *self.memory_by_uid.entry(peer.uid).or_insert(0) += cost;
        let conn = Connection::new(
            id,
            service.id(),
            channel,
            self.shared.waker.clone(),
            self.response_timeout,
            service.outbound(),
        );
        if let Err(e) = poller.register(conn.inner.channel.socket_fd(), Token(id)) {
            log::warn!("client {id}: cannot register: {e}");
            self.finish_close(conn);
            return;
        }
        let bell_edge = match poller.register_edge(conn.inner.channel.request_fd(), Token(id)) {
            Ok(edge) => edge,
            Err(e) => {
                log::warn!("client {id}: cannot register: {e}");
                let _ = poller.deregister(conn.inner.channel.socket_fd());
                self.finish_close(conn);
                return;
            }
        };
        if self.paused_services.contains(&service.id()) {
            conn.inner.channel.set_request_paused(true);
        }
        lock(&self.shared.registry).insert(id, conn.clone());
        self.conns.insert(
            id,
            Entry {
                conn: conn.clone(),
                service: service.clone(),
                state: Box::new(()),
                armed: false,
                bell_edge,
            },
        );
        self.active.push(id);
        match service.connect(&conn) {
            Ok(state) => {
                if let Some(e) = self.conns.get_mut(&id) {
                    e.state = state;
                }
                self.serve(id, poller);
            }
            Err(refusal) => {
                log::info!("client {id}: service {} refused the connection: {refusal}", service.id());
                // No state was made, so there is no disconnect callback.
                self.conns.remove(&id);
                self.unregister(&conn, poller);
                self.finish_close(conn);
            }
        }
    }

    /// The admission checks that need no memory: service, limits, auth.
    fn admit(&self, pending: &PendingHandshake, service: u16) -> Result<Arc<dyn ServiceDyn>, Refusal> {
        let svc = self.services.get(&service).ok_or(Refusal::NoSuchService)?;
        // Connections whose disconnect callback asked to be retried still
        // hold their descriptors and memory.
        if self.conns.len() + self.closing.len() >= self.max_connections {
            return Err(Refusal::ConnectionLimit);
        }
        if let Some(max) = svc.max_connections() {
            if self.conns.values().filter(|e| e.service.id() == service).count() >= max {
                return Err(Refusal::ConnectionLimit);
            }
        }
        if let Some(auth) = &self.auth {
            let peer = pending.peer();
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| auth(&peer, service)));
            match verdict {
                Ok(v) => v?,
                Err(p) => {
                    // A panicking decision is no "yes": refuse this client only.
                    log::error!(
                        "the authentication callback panicked (pid {:?}): {}",
                        peer.pid,
                        crate::service::panic_text(&*p)
                    );
                    return Err(Refusal::AccessDenied);
                }
            }
        }
        Ok(svc.clone())
    }
}
