//! The protocol core shared by the blocking and the async client: sending
//! under sequence numbers, matching responses to requests (stashing answers
//! for other callers, dropping late ones), and decoding dispatch messages.

use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::time::{Duration, Instant};

use coroipc_transport::channel::{ChannelError, ClientDispatch, ClientRequests};
use coroipc_transport::message::{MessageHeader, Status, FLAG_ONEWAY, HEADER_LEN};

use crate::client::DispatchInfo;
use crate::error::{Error, Result};

/// The request/response state: the transport's half plus the matching of
/// responses to requests. Locked only for short steps, never across a
/// sleep (except by a [`ResponseGuard`]).
pub(crate) struct Core {
    pub(crate) channel: ClientRequests,
    /// The next request's sequence number: starts at 1 and only increases,
    /// so no two requests of a connection share one and a late answer can
    /// never be taken for a later request's.
    pub(crate) next_seq: u64,
    /// Every request whose answer someone still waits for: calls and
    /// tickets. An answer to anything else (a call that timed out, a
    /// sequence number never sent) is dropped, so the stash stays bounded.
    pub(crate) wanted: HashSet<u64>,
    /// Pipelined requests (tickets) whose response has not been collected.
    /// Each is in `wanted` until its answer is taken (the async client's
    /// `wait` removes it from here just after).
    pub(crate) outstanding: HashSet<u64>,
    /// Answers that arrived before their caller looked: (status, payload).
    /// Invariant: every key is in `wanted` (an answer is only stashed for
    /// someone who waits for it, and leaves with its `wanted` entry).
    pub(crate) arrived: HashMap<u64, (Status, Vec<u8>)>,
    pub(crate) max_in_flight: usize,
    /// The response of the last synchronous call that did not fit the
    /// caller's buffer.
    pub(crate) kept: Option<Vec<u8>>,
    /// An answer was stashed for another caller since the flag was cleared.
    pub(crate) stashed: bool,
    /// Async calls waiting (they keep the response ring's poller
    /// announcement up).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) async_waiters: usize,
}

/// Which response a wait is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// The answer to this sequence number.
    Seq(u64),
    /// The answer to any outstanding ticket.
    AnyTicket,
}

/// A deadline read off the clock only when a wait is actually needed (the
/// common case — an answer that is already there — reads no clock; clock
/// reads showed at 12% of the pipelined profile).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    timeout: Option<Duration>,
    at: Option<Instant>,
}

impl Deadline {
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        Self { timeout, at: None }
    }

    /// Whether the caller asked not to wait at all.
    pub(crate) fn is_now(&self) -> bool {
        self.timeout == Some(Duration::ZERO)
    }

    /// The deadline, fixed the first time it is asked for.
    pub(crate) fn get(&mut self) -> Option<Instant> {
        let t = self.timeout?;
        Some(*self.at.get_or_insert_with(|| Instant::now() + t))
    }
}

/// An answer found for a caller: still in the ring (peeked), or stashed.
pub(crate) enum Answer {
    InRing(Status, usize),
    Stashed(Status, Vec<u8>),
}

impl Core {
    /// Sends a request under the next sequence number and marks its answer
    /// as wanted.
    pub(crate) fn send(
        &mut self,
        command: u16,
        flags: u32,
        parts: &[IoSlice<'_>],
        deadline: &mut Deadline,
    ) -> Result<u64> {
        let seq = self.next_seq;
        let header = MessageHeader { id: u32::from(command), flags, seq }.encode();
        // Header + parts, on the stack for up to three parts (no allocation
        // per call).
        let mut inline = [IoSlice::new(&[]); 4];
        let heap;
        let iov: &[IoSlice<'_>] = if parts.len() < inline.len() {
            inline[0] = IoSlice::new(&header);
            inline[1..=parts.len()].copy_from_slice(parts);
            &inline[..=parts.len()]
        } else {
            heap = [&[IoSlice::new(&header)][..], parts].concat();
            &heap
        };
        match self.channel.try_send(iov) {
            Err(ChannelError::TryAgain) if !deadline.is_now() => self.channel.send(iov, deadline.get())?,
            other => other?,
        }
        self.next_seq += 1;
        if flags & FLAG_ONEWAY == 0 {
            self.wanted.insert(seq);
        }
        Ok(seq)
    }

    /// Forgets request `seq`: its answer, if it comes, is dropped.
    pub(crate) fn abandon(&mut self, seq: u64) {
        self.wanted.remove(&seq);
        self.outstanding.remove(&seq);
        self.arrived.remove(&seq);
    }

    /// Looks at the responses that have arrived, without waiting, for the
    /// one wanted. That one is left peeked (readable through
    /// `current_response`) and returned as (seq, status, length); answers
    /// other callers still want are stashed for them (and `stashed` set);
    /// answers nobody wants are dropped. The one place responses are
    /// matched to requests — every blocking and async wait goes through it.
    pub(crate) fn next_response(&mut self, want: Want) -> Result<Option<(u64, Status, usize)>> {
        loop {
            let Some(msg) = self.channel.peek_response()? else {
                return Ok(None);
            };
            let Some(h) = MessageHeader::decode(msg) else {
                self.channel.release_response();
                return Err(Error::Protocol("response shorter than its header".into()));
            };
            let len = msg.len() - HEADER_LEN;
            let hit = match want {
                Want::Seq(seq) => h.seq == seq,
                Want::AnyTicket => self.outstanding.contains(&h.seq),
            };
            let wanted = self.wanted.contains(&h.seq);
            if hit && wanted {
                return Ok(Some((h.seq, Status::from_code(h.id), len)));
            }
            if wanted {
                let payload = msg[HEADER_LEN..].to_vec();
                self.arrived.insert(h.seq, (Status::from_code(h.id), payload));
                self.stashed = true;
            }
            self.channel.release_response();
        }
    }

    /// The answer to `seq` if it is there (stashed or next in the ring);
    /// marks it no longer wanted.
    pub(crate) fn find(&mut self, seq: u64) -> Result<Option<Answer>> {
        // Stashes are rare (concurrent callers): no hashing when empty.
        if let Some((status, payload)) =
            (!self.arrived.is_empty()).then(|| self.arrived.remove(&seq)).flatten()
        {
            self.wanted.remove(&seq);
            return Ok(Some(Answer::Stashed(status, payload)));
        }
        Ok(self.next_response(Want::Seq(seq))?.map(|(seq, status, len)| {
            self.wanted.remove(&seq);
            Answer::InRing(status, len)
        }))
    }

    /// Copies out and releases the response left peeked in the ring.
    pub(crate) fn take_in_ring(&mut self) -> Vec<u8> {
        let payload = self.channel.current_response().map(|m| m[HEADER_LEN..].to_vec()).unwrap_or_default();
        self.channel.release_response();
        payload
    }

    /// Takes the stashed or arrived response of `seq` as an owned
    /// message, without waiting.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_take(&mut self, seq: u64) -> Result<Option<(Status, Vec<u8>)>> {
        Ok(match self.find(seq)? {
            Some(Answer::Stashed(status, payload)) => Some((status, payload)),
            Some(Answer::InRing(status, _)) => Some((status, self.take_in_ring())),
            None => None,
        })
    }

    /// Copies the peeked response `seq` into `buf` and releases it. A
    /// response larger than `buf` is kept, not lost: a pipelined one stays
    /// stashed under its ticket (`keep_as_ticket`; `wait` it again with a
    /// larger buffer), a synchronous call's is kept for
    /// [`Client::take_kept_response`].
    pub(crate) fn copy_answer(
        &mut self,
        seq: u64,
        answer: Answer,
        buf: &mut [u8],
        keep_as_ticket: bool,
    ) -> Result<usize> {
        let (status, payload) = match answer {
            Answer::InRing(status, len) => {
                if let Some(e) = Error::from_status(status) {
                    self.channel.release_response();
                    return Err(e);
                }
                if len <= buf.len() {
                    if let Some(m) = self.channel.current_response() {
                        buf[..len].copy_from_slice(&m[HEADER_LEN..]);
                    }
                    self.channel.release_response();
                    return Ok(len);
                }
                (status, self.take_in_ring())
            }
            Answer::Stashed(status, payload) => {
                if let Some(e) = Error::from_status(status) {
                    return Err(e);
                }
                (status, payload)
            }
        };
        if payload.len() > buf.len() {
            let needed = payload.len();
            if keep_as_ticket {
                self.outstanding.insert(seq);
                self.wanted.insert(seq);
                self.arrived.insert(seq, (status, payload));
            } else {
                self.kept = Some(payload);
            }
            return Err(Error::BufferTooSmall { needed });
        }
        buf[..payload.len()].copy_from_slice(&payload);
        Ok(payload.len())
    }
}

/// Peeks the next dispatch message and decodes its header; the message
/// stays peeked (readable through `current_dispatch`) until released.
/// `TryAgain` if there is none. Shared by every dispatch receive, blocking
/// or async.
pub(crate) fn peek_dispatch(dispatch: &mut ClientDispatch, spin: Duration) -> Result<DispatchInfo> {
    let Some(msg) = dispatch.peek_dispatch_spin(spin)? else {
        return Err(Error::TryAgain);
    };
    let Some(h) = MessageHeader::decode(msg) else {
        dispatch.release_dispatch();
        return Err(Error::Protocol("dispatch message shorter than its header".into()));
    };
    Ok(DispatchInfo { id: h.id, seq: h.seq, len: msg.len() - HEADER_LEN })
}
