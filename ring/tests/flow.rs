//! Flow-control watermarks with hysteresis.
#![cfg(not(coroipc_loom))]
mod common;

use common::Ring;
use coroipc_ring::{FlowChange, FlowState, RingConfig, Watermarks};

#[test]
fn flow_control_turns_on_at_high_and_off_at_low() {
    let ring = Ring::new(RingConfig::new(1024).with_watermarks(Watermarks { high: 512, low: 128 }));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let rec = [0u8; 56]; // 64 bytes a record
    for i in 0..7 {
        assert_eq!(tx.try_push(&rec).unwrap(), FlowChange::None, "record {i}: below high");
    }
    assert_eq!(tx.try_push(&rec).unwrap(), FlowChange::Raised, "fill 512 reaches high");
    assert_eq!(tx.flow_state(), FlowState::On);
    assert_eq!(rx.flow_state(), FlowState::On, "both sides see the shared state");
    assert_eq!(tx.try_push(&rec).unwrap(), FlowChange::None, "already on");
    let mut buf = [0u8; 64];
    // fill 576 -> 192: still above low, hysteresis keeps it on
    for _ in 0..6 {
        rx.try_pop(&mut buf).unwrap();
        assert_eq!(rx.flow_state(), FlowState::On);
    }
    let g = rx.try_peek().unwrap();
    assert_eq!(g.release(), FlowChange::Cleared, "fill 128 reaches low");
    assert_eq!(tx.flow_state(), FlowState::Off);
}

#[test]
fn rings_without_watermarks_never_raise() {
    let ring = Ring::new(RingConfig::new(256));
    let mut tx = ring.producer();
    while let Ok(change) = tx.try_push(&[0; 24]) {
        assert_eq!(change, FlowChange::None);
    }
    assert_eq!(tx.flow_state(), FlowState::Off);
}

#[test]
fn flow_control_is_never_left_on_over_a_drained_ring() {
    // Concurrent producer and consumer; at the end the ring is empty and
    // flow control must be off (the FLOW handshake in flow.rs).
    let ring = Ring::new(RingConfig::new(1024).with_watermarks(Watermarks { high: 256, low: 64 }));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    const N: u32 = 100_000;
    let producer = std::thread::spawn(move || {
        let (mut sent, mut raised) = (0, 0u32);
        while sent < N {
            match tx.try_push(&sent.to_le_bytes()) {
                Ok(change) => {
                    sent += 1;
                    raised += u32::from(change == FlowChange::Raised);
                }
                Err(_) => std::thread::yield_now(),
            }
        }
        (tx, raised)
    });
    let (mut got, mut cleared) = (0, 0u32);
    while got < N {
        if let Ok(g) = rx.try_peek() {
            let mut b = [0u8; 4];
            g.copy_to(&mut b);
            assert_eq!(u32::from_le_bytes(b), got, "in order");
            cleared += u32::from(g.release() == FlowChange::Cleared);
            got += 1;
        }
    }
    let (tx, raised) = producer.join().unwrap();
    assert_eq!(tx.flow_state(), FlowState::Off, "drained ring, flow control off");
    assert_eq!(raised, cleared, "every raise is matched by one clear");
}
