//! Statistics per connection and per server.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one connection (or, summed, of a server).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests received.
    pub requests: u64,
    /// Responses sent.
    pub responses: u64,
    /// Dispatch messages sent.
    pub dispatched: u64,
    /// Request bytes received (headers included).
    pub bytes_in: u64,
    /// Response and dispatch bytes sent (headers included).
    pub bytes_out: u64,
    /// Times dispatch flow control turned on.
    pub flow_control_on: u64,
    /// Times dispatch flow control turned off.
    pub flow_control_off: u64,
    /// "Try again" answers: dispatch refused under flow control or a full
    /// ring, requests vetoed by admission.
    pub retries: u64,
    /// Errors: invalid requests, failed sends, corrupt rings.
    pub errors: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.requests += o.requests;
        self.responses += o.responses;
        self.dispatched += o.dispatched;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.flow_control_on += o.flow_control_on;
        self.flow_control_off += o.flow_control_off;
        self.retries += o.retries;
        self.errors += o.errors;
    }

    /// The sum of `items`.
    pub fn sum<'a>(items: impl IntoIterator<Item = &'a Stats>) -> Stats {
        let mut total = Stats::default();
        for s in items {
            total.add(s);
        }
        total
    }
}

/// The live counters behind a [`Stats`] snapshot.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) responses: AtomicU64,
    pub(crate) dispatched: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) flow_control_on: AtomicU64,
    pub(crate) flow_control_off: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl Counters {
    #[inline]
    pub(crate) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            requests: self.requests.load(Relaxed),
            responses: self.responses.load(Relaxed),
            dispatched: self.dispatched.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            flow_control_on: self.flow_control_on.load(Relaxed),
            flow_control_off: self.flow_control_off.load(Relaxed),
            retries: self.retries.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}
