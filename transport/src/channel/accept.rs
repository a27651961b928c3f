//! The server's side of a handshake: a connection whose hello is being
//! read without blocking, then accepted (memory created) or refused
//! (nothing created).

use std::io::{self};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use coroipc_ring::{
    init, Consumer, MpscProducer, Producer, Region as RingRegion, RingAttachError, RingConfig, Watermarks,
};

use crate::bell::Bell;
use crate::control::Control;
use crate::handshake::{
    Accepted, ClientHello, HandshakeDecodeError, Refusal, RingSizes, ServerReply, Span, HELLO_LEN,
};
use crate::segment::Segment;
use crate::socket::{
    close_in_background, release_in_background, PeerCred, SocketRecvError, Stream, MAX_FDS_PER_MESSAGE,
};

use super::server::RequestSide;
use super::{layout_for, HandshakeError, Limits, ServerChannel, REPLY_FDS};

/// A connection accepted on the listener whose hello is being read.
///
/// Nonblocking: call [`poll_hello`](Self::poll_hello) whenever the socket is
/// readable; it never waits. Drop it (or let its deadline pass) to give up.
#[derive(Debug)]
pub struct PendingHandshake {
    stream: Stream,
    peer: PeerCred,
    buf: [u8; HELLO_LEN],
    got: usize,
    started: Instant,
}

impl PendingHandshake {
    /// Starts the handshake on an accepted stream: makes it nonblocking and
    /// reads the peer's credentials from the kernel (`SO_PEERCRED`).
    ///
    /// # Errors
    ///
    /// The `fcntl`/`getsockopt` error.
    pub fn new(stream: Stream) -> io::Result<Self> {
        stream.as_std().set_nonblocking(true)?;
        let peer = stream.peer_credentials()?;
        Ok(Self { stream, peer, buf: [0; HELLO_LEN], got: 0, started: Instant::now() })
    }

    /// The peer's credentials, from the kernel.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// When the handshake started (for a server-side deadline).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The socket, to register with an event loop.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Reads what has arrived; returns the hello once complete.
    ///
    /// # Errors
    ///
    /// [`HandshakeError::Closed`] on end of stream, `Decode` for a malformed
    /// hello, `Io` otherwise.
    pub fn poll_hello(
        &mut self,
    ) -> Result<Option<Result<ClientHello, HandshakeDecodeError>>, HandshakeError> {
        while self.got < HELLO_LEN {
            // Not `read(2)`: descriptors attached to the hello (where the
            // kernel does not refuse them, see `socket`) would be closed by
            // the kernel in this thread, the event loop's, and the last
            // close of a lingering socket blocks. `recv_with_fds` with room
            // for none hands whatever came to the closer thread.
            match self.stream.recv_with_fds(&mut self.buf[self.got..], MAX_FDS_PER_MESSAGE) {
                Ok((0, _)) => {
                    self.release();
                    return Err(HandshakeError::Closed);
                }
                Ok((n, fds)) => {
                    self.got += n;
                    fds.into_iter().for_each(close_in_background);
                }
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.release();
                    return Err(io::Error::from(e).into());
                }
            }
        }
        Ok(Some(ClientHello::decode(&self.buf)))
    }

    /// Refuses the connection: sends the refusal (best effort, never
    /// blocking) and closes. Nothing was created for it.
    pub fn refuse(self, refusal: Refusal) {
        let _ = self.stream.send_with_fds(&ServerReply::Refused(refusal).encode(), &[]);
        self.release();
    }

    /// Where the kernel cannot refuse the client's descriptors: makes sure
    /// the ones it may still have queued are closed on the closer thread,
    /// not by this socket's close in the caller's thread.
    fn release(&self) {
        release_in_background(self.stream.as_fd(), true);
    }

    /// Accepts: creates the segment, rings and bells for `sizes` (from
    /// [`negotiate`](super::negotiate)) and sends them to the client.
    ///
    /// # Errors
    ///
    /// The error of creating the memfd or eventfds, or of sending the reply
    /// (a client that vanished).
    pub fn accept(self, sizes: RingSizes, limits: &Limits) -> io::Result<ServerChannel> {
        let layout = layout_for(&sizes);
        let accepted = Accepted { sizes, layout };
        debug_assert!(accepted.validate().is_ok(), "server computed an invalid layout");
        let segment = Arc::new(Segment::create(layout.segment_len as usize)?);
        Control::new(&segment, layout.control.offset).init();
        let max_record = u64::from(sizes.max_message_bytes);
        let region: Arc<dyn RingRegion> = segment.clone();
        let ring_init = |r: Span, cap: u32, wm: Option<Watermarks>| {
            let mut config = RingConfig::new(u64::from(cap)).with_max_record(max_record);
            if let Some(w) = wm {
                config = config.with_watermarks(w);
            }
            init(&region, r.offset as usize, r.len as usize, &config)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        };
        ring_init(layout.request, sizes.request_ring_bytes, None)?;
        ring_init(layout.response, sizes.response_ring_bytes, None)?;
        let cap = u64::from(sizes.dispatch_ring_bytes);
        let wm =
            Watermarks::percent(cap, limits.dispatch_high_percent.into(), limits.dispatch_low_percent.into());
        ring_init(layout.dispatch, sizes.dispatch_ring_bytes, wm.is_valid_for(cap).then_some(wm))?;
        let attach_err = |e: RingAttachError| io::Error::new(io::ErrorKind::InvalidData, e);
        let requests =
            Consumer::attach(region.clone(), layout.request.offset as usize, layout.request.len as usize)
                .map_err(attach_err)?;
        let responses =
            Producer::attach(region.clone(), layout.response.offset as usize, layout.response.len as usize)
                .map_err(attach_err)?;
        let dispatch =
            MpscProducer::attach(region, layout.dispatch.offset as usize, layout.dispatch.len as usize)
                .map_err(attach_err)?;
        let bells = [Bell::new()?, Bell::new()?, Bell::new()?];
        let fds: [BorrowedFd<'_>; REPLY_FDS] =
            [segment.as_fd(), bells[0].as_fd(), bells[1].as_fd(), bells[2].as_fd()];
        self.stream.send_with_fds(&ServerReply::Accepted(accepted).encode(), &fds)?;
        let [request_bell, response_bell, dispatch_bell] = bells;
        Ok(ServerChannel {
            stream: self.stream,
            peer: self.peer,
            accepted,
            requests: Mutex::new(RequestSide { consumer: requests, armed: None }),
            responses: Mutex::new(responses),
            dispatch,
            request_bell,
            response_bell,
            dispatch_bell,
            segment,
        })
    }
}
