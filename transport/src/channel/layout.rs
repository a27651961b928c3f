//! Size negotiation and the segment layout: what a server grants for
//! what a client asks, and where the control block and the rings go.

use coroipc_ring::{record_size, required_size};

use crate::control::CONTROL_LEN;
use crate::handshake::{Refusal, RingSizes, SegmentLayout, Span, MAX_RING_BYTES, MIN_RING_BYTES};

/// The server's limits on what a client may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (header included) in any direction.
    pub max_message_bytes: u32,
    /// Largest ring data area.
    pub max_ring_bytes: u32,
    /// Sizes used where the client asks for 0 ("server default").
    pub defaults: RingSizes,
    /// Dispatch flow control: on at this percentage of the dispatch ring,
    /// off again at `dispatch_low_percent`.
    pub dispatch_high_percent: u8,
    /// See `dispatch_high_percent`.
    pub dispatch_low_percent: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_ring_bytes: 1 << 24,
            defaults: RingSizes {
                request_ring_bytes: 1 << 16,
                response_ring_bytes: 1 << 16,
                dispatch_ring_bytes: 1 << 20,
                max_message_bytes: 8 << 10,
            },
            dispatch_high_percent: 75,
            dispatch_low_percent: 25,
        }
    }
}

/// Smallest ring that carries `max_message`-byte records (a record may use
/// at most half a ring, see `coroipc_ring::max_payload_for`).
fn ring_for(max_message: u32) -> u64 {
    (2 * record_size(u64::from(max_message))).next_power_of_two().max(u64::from(MIN_RING_BYTES))
}

/// What the server grants for `asked` under `limits`, or why not.
///
/// # Errors
///
/// [`Refusal::TooBig`] if the message size or a ring exceeds the limits.
pub fn negotiate(asked: &RingSizes, limits: &Limits) -> Result<RingSizes, Refusal> {
    let pick = |v: u32, default: u32| if v == 0 { default } else { v };
    let max_message = pick(asked.max_message_bytes, limits.defaults.max_message_bytes);
    if max_message > limits.max_message_bytes || max_message < crate::message::HEADER_LEN as u32 {
        return Err(Refusal::TooBig);
    }
    let need = ring_for(max_message);
    let ring = |v: u32, default: u32| -> Result<u32, Refusal> {
        let bytes = u64::from(pick(v, default)).max(need).next_power_of_two();
        if bytes > u64::from(limits.max_ring_bytes) || bytes > u64::from(MAX_RING_BYTES) {
            return Err(Refusal::TooBig);
        }
        Ok(bytes as u32)
    };
    Ok(RingSizes {
        request_ring_bytes: ring(asked.request_ring_bytes, limits.defaults.request_ring_bytes)?,
        response_ring_bytes: ring(asked.response_ring_bytes, limits.defaults.response_ring_bytes)?,
        dispatch_ring_bytes: ring(asked.dispatch_ring_bytes, limits.defaults.dispatch_ring_bytes)?,
        max_message_bytes: max_message,
    })
}

/// The segment layout for granted sizes: control block, then the request,
/// response and dispatch rings, each 128-aligned; the length rounded up to
/// a page.
pub fn layout_for(sizes: &RingSizes) -> SegmentLayout {
    let control = Span { offset: 0, len: CONTROL_LEN };
    let mut at = CONTROL_LEN.next_multiple_of(128);
    let mut next = |cap: u32| {
        let r = Span { offset: at, len: required_size(u64::from(cap)) as u64 };
        at = (at + r.len).next_multiple_of(128);
        r
    };
    let request = next(sizes.request_ring_bytes);
    let response = next(sizes.response_ring_bytes);
    let dispatch = next(sizes.dispatch_ring_bytes);
    SegmentLayout { segment_len: at.next_multiple_of(4096), control, request, response, dispatch }
}
