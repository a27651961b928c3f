//! The peer is untrusted: every way it can corrupt the ring yields a typed
//! error, never a panic, an out-of-bounds access or an endless loop.
#![cfg(not(coroipc_loom))]
mod common;

use common::*;
use coroipc_ring::{
    fuzz, Consumer, Corruption, PopError, Producer, PushError, RingAttachError, RingConfig, Watermarks,
    RING_VERSION,
};

fn fresh() -> Ring {
    Ring::new(RingConfig::new(1024).with_watermarks(Watermarks { high: 768, low: 256 }))
}

fn attach_error(ring: &Ring) -> RingAttachError {
    let c = Consumer::attach(ring.region.clone(), 0, ring.size).expect_err("consumer must refuse");
    let p = Producer::attach(ring.region.clone(), 0, ring.size).expect_err("producer must refuse");
    assert_eq!(c, p, "both ends agree on what is wrong");
    c
}

#[test]
fn attach_rejects_each_corrupt_header_field() {
    let r = fresh();
    r.poke_u64(MAGIC, 0xdead_beef);
    assert_eq!(attach_error(&r), RingAttachError::BadMagic(0xdead_beef));

    let r = fresh();
    r.poke_u32(VERSION, RING_VERSION + 1);
    assert_eq!(
        attach_error(&r),
        RingAttachError::VersionMismatch { found: RING_VERSION + 1, expected: RING_VERSION }
    );

    let r = fresh();
    r.poke_u32(FLAGS, 4);
    assert_eq!(attach_error(&r), RingAttachError::UnknownFlags(4));

    for bad in [0u64, 1000, 32, 1 << 50] {
        let r = fresh();
        r.poke_u64(CAPACITY, bad);
        assert_eq!(attach_error(&r), RingAttachError::BadCapacity(bad), "capacity {bad}");
    }

    let r = fresh();
    r.poke_u64(CAPACITY, 4096); // valid power of two, but larger than the region
    assert!(matches!(attach_error(&r), RingAttachError::RegionTooSmall { .. }));

    for bad in [0u64, 512, u64::MAX] {
        let r = fresh();
        r.poke_u64(MAX_RECORD, bad);
        assert_eq!(attach_error(&r), RingAttachError::BadMaxRecord(bad), "max record {bad}");
    }

    let r = fresh();
    r.poke_u64(LOW, 900); // low above high
    assert_eq!(attach_error(&r), RingAttachError::BadWatermarks { high: 768, low: 900 });

    let r = fresh();
    r.poke_u64(HIGH, 4096); // high above capacity
    assert!(matches!(attach_error(&r), RingAttachError::BadWatermarks { .. }));

    for (head, tail) in [(8u64, 0u64), (0, 1032), (0, 4), (3, 8)] {
        let r = fresh();
        r.poke_u64(HEAD, head);
        r.poke_u64(TAIL, tail);
        assert_eq!(attach_error(&r), RingAttachError::BadPositions { head, tail });
    }
}

#[test]
fn attach_rejects_short_and_misaligned_spans() {
    let r = fresh();
    assert!(matches!(
        Consumer::attach(r.region.clone(), 0, 100),
        Err(RingAttachError::RegionTooSmall { .. })
    ));
    assert!(matches!(
        Consumer::attach(r.region.clone(), 0, r.size - 8),
        Err(RingAttachError::RegionTooSmall { .. })
    ));
    assert!(matches!(Consumer::attach(r.region.clone(), 8, r.size - 8), Err(RingAttachError::Misaligned)));
    assert!(matches!(
        Consumer::attach(r.region.clone(), usize::MAX, 2),
        Err(RingAttachError::RegionTooSmall { .. })
    ));
}

#[test]
fn consumer_rejects_a_tail_behind_the_head_past_capacity_or_unaligned() {
    for bad_tail in [u64::MAX - 7, 1024 + 8, 12, 1 << 62] {
        let r = fresh();
        let mut rx = r.consumer();
        r.poke_u64(TAIL, bad_tail);
        assert_eq!(
            rx.try_peek().unwrap_err(),
            PopError::Corrupt(Corruption::Tail { head: 0, tail: bad_tail }),
            "tail {bad_tail}"
        );
        assert!(rx.has_data().is_err());
    }
}

#[test]
fn producer_rejects_a_head_ahead_of_the_tail_or_unaligned() {
    for bad_head in [8u64, 4, u64::MAX - 2047] {
        let r = Ring::new(RingConfig::new(128));
        let mut tx = r.producer();
        let _ = tx.try_push(&[0; 56]).unwrap();
        let _ = tx.try_push(&[0; 56]).unwrap(); // full: the next push must read head
        r.poke_u64(HEAD, bad_head);
        let err = tx.try_push(&[1]).unwrap_err();
        assert!(
            matches!(err, PushError::Corrupt(Corruption::Head { .. }))
                || (bad_head == 8 && err == PushError::Full),
            "head {bad_head}: {err:?}"
        );
    }
    // A head that claims more than everything was consumed.
    let r = Ring::new(RingConfig::new(128));
    let mut tx = r.producer();
    let _ = tx.try_push(&[0; 56]).unwrap();
    let _ = tx.try_push(&[0; 56]).unwrap();
    r.poke_u64(HEAD, 1 << 40);
    assert!(matches!(tx.try_push(&[1]), Err(PushError::Corrupt(Corruption::Head { .. }))));
}

#[test]
fn consumer_rejects_bad_record_lengths_and_kinds() {
    let data = u32::from_le_bytes(*b"DATA") as u64;
    let padd = u32::from_le_bytes(*b"PADD") as u64;
    let cases: &[(u64, &str)] = &[
        ((data << 32) | 600, "longer than max record (504)"),
        ((data << 32) | 0xffff_ffff, "huge"),
        ((data << 32) | 250, "past the published tail"),
        ((padd << 32) | 2000, "padding past the end"),
        ((0x1234 << 32) | 8, "unknown kind"),
        (0, "zeroed header"),
    ];
    for &(word, what) in cases {
        let r = fresh();
        let (mut tx, mut rx) = (r.producer(), r.consumer());
        let _ = tx.try_push(&[0; 56]).unwrap();
        r.poke_u64(DATA, word);
        let err = rx.try_peek().unwrap_err();
        assert!(matches!(err, PopError::Corrupt(_)), "{what}: {err:?}");
        // The consumer stays usable for the caller to inspect; no panic on repeat.
        assert!(matches!(rx.try_pop(&mut [0; 8]), Err(PopError::Corrupt(_))), "{what} again");
    }
}

#[test]
fn zero_and_odd_lengths_are_accepted_when_consistent() {
    let data = u32::from_le_bytes(*b"DATA") as u64;
    for len in [0u64, 1, 3, 7] {
        let r = fresh();
        let (mut tx, mut rx) = (r.producer(), r.consumer());
        let _ = tx.try_push(&[5; 8]).unwrap(); // 16 bytes published
        r.poke_u64(DATA, (data << 32) | len); // a shorter record inside the span
        let g = rx.try_peek().expect("a consistent shorter record is not corruption");
        assert_eq!(g.len() as u64, len);
    }
}

#[test]
fn a_hostile_producer_cannot_keep_the_consumer_looping() {
    // A ring full of padding records: one peek skips at most what was
    // published when it started, then reports Empty.
    let r = Ring::new(RingConfig::new(1024));
    let mut rx = r.consumer();
    let padd = u32::from_le_bytes(*b"PADD") as u64;
    for i in 0..128 {
        r.poke_u64(DATA + i * 8, padd << 32);
    }
    r.poke_u64(TAIL, 1024);
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty);
    assert_eq!(r.peek_u64(HEAD), 1024, "skipped padding is released");
}

#[test]
fn hostile_wait_and_flow_words_cost_only_spurious_work() {
    let r = fresh();
    let (mut tx, mut rx) = (r.producer(), r.consumer());
    r.poke_u32(DATA_WAITERS, u32::MAX);
    r.poke_u32(FLOW, 0xabcd);
    let _ = tx.try_push(b"still works").unwrap();
    assert_eq!(rx.try_pop_vec().unwrap(), b"still works");
    assert_eq!(rx.flow_state(), coroipc_ring::FlowState::On, "garbage reads as on (conservative)");
}

#[test]
fn random_byte_flips_in_a_live_ring_never_panic() {
    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let r = fresh();
        let (mut tx, mut rx) = (r.producer(), r.consumer());
        let mtx = r.mpsc();
        let mut buf = [0u8; 600];
        for step in 0..200 {
            match rng.below(5) {
                0 => {
                    let at = rng.below(r.size as u64) as usize;
                    r.poke_u8(at, rng.next_u64() as u8);
                }
                1 => {
                    let _ = tx.try_push(&buf[..rng.below(600) as usize]);
                }
                2 => {
                    let _ = mtx.try_push(&buf[..rng.below(600) as usize]);
                }
                _ => {
                    if let Ok(n) = rx.try_pop(&mut buf) {
                        assert!(n <= 504, "round {round} step {step}: record over max");
                    }
                }
            }
        }
    }
}

#[test]
fn fuzz_harnesses_survive_pseudo_random_inputs() {
    let mut rng = XorShift::new(42);
    for _ in 0..400 {
        let len = rng.below(2048) as usize;
        let input: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        fuzz::ring_ops(&input);
        fuzz::ring_hostile(&input);
    }
}

#[test]
fn positions_near_the_top_of_u64_are_corruption_not_overflow() {
    // A head that wraps "just behind" a small tail would pass a wrapping
    // distance check; every position beyond MAX_POSITION is rejected, so no
    // arithmetic on it can overflow (found by a hostile-client test: a
    // debug-build overflow panic in `Producer::has_space_uncached`).
    let wrapped = u64::MAX - 7;
    let r = Ring::new(RingConfig::new(128));
    let (mut tx, mtx) = (r.producer(), r.mpsc());
    let _ = tx.try_push(&[0; 8]).unwrap();
    r.poke_u64(HEAD, wrapped);
    assert!(tx.has_space_uncached(8), "a corrupt head counts as 'fits' so that the push reports it");
    let _ = mtx.has_space_uncached(8);
    assert!(matches!(tx.try_push(&[0; 56]), Ok(_) | Err(PushError::Corrupt(_))));
    let _ = tx.try_push(&[0; 56]);
    assert!(matches!(tx.try_push(&[0; 56]), Err(PushError::Corrupt(Corruption::Head { .. }))));
    assert!(matches!(mtx.try_push(&[0; 56]), Err(PushError::Corrupt(Corruption::Head { .. })) | Ok(_)));

    let r = fresh();
    r.poke_u64(HEAD, wrapped);
    r.poke_u64(TAIL, 8);
    assert_eq!(attach_error(&r), RingAttachError::BadPositions { head: wrapped, tail: 8 });
    let r = fresh();
    r.poke_u64(HEAD, 1 << 63);
    r.poke_u64(TAIL, 1 << 63);
    assert!(matches!(attach_error(&r), RingAttachError::BadPositions { .. }), "beyond MAX_POSITION");

    let r = fresh();
    let mut rx = r.consumer();
    r.poke_u64(TAIL, 1 << 63);
    assert!(matches!(rx.try_peek(), Err(PopError::Corrupt(Corruption::Tail { .. }))));
}

/// Rings the way the tests above build them (largest records) and the way
/// the transport builds its rings (a `max_record` far below half the
/// capacity).
fn bounds_configs() -> Vec<RingConfig> {
    vec![
        RingConfig::new(1024),
        RingConfig::new(1024).with_max_record(64),
        RingConfig::new(1024).with_max_record(8).with_watermarks(Watermarks { high: 768, low: 256 }),
        RingConfig::new(4096).with_max_record(200),
    ]
}

/// The end-of-area check on its own: the peer publishes a whole capacity
/// (so the record is far inside the published span), puts the consumer's
/// position 8 bytes before the end of the data area, and writes a data
/// record there that is short enough for `max_record` but crosses the end.
/// Only the end-of-area check can report it; without that check the
/// consumer hands out a grant past the data area (mutant
/// `verification/mutants/peek-no-end-check.patch`, which this test kills).
#[test]
fn a_record_crossing_the_end_of_the_data_area_is_reported_as_such() {
    let data = u64::from(u32::from_le_bytes(*b"DATA"));
    for config in bounds_configs() {
        let cap = config.capacity as usize;
        for len in [1u64, 8, config.max_record] {
            let r = Ring::new(config);
            let head = (cap - 8) as u64;
            r.poke_u64(HEAD, head);
            r.poke_u64(TAIL, head + cap as u64);
            r.poke_u64(DATA + cap - 8, (data << 32) | len);
            let mut rx = r.consumer();
            assert_eq!(
                rx.try_peek().unwrap_err(),
                PopError::Corrupt(Corruption::RecordCrossesEnd {
                    index: head,
                    size: 8 + len.div_ceil(8) * 8
                }),
                "capacity {cap}, max record {}, len {len}",
                config.max_record
            );
        }
    }
}

/// The maximum-record check on its own: a data record one byte (and one
/// word) longer than `max_record`, at index 0 of a ring whose whole
/// capacity is published, so it neither crosses the end nor passes the
/// tail. Only the maximum-record check can report it; without that check
/// the consumer hands out a record longer than the ring promises (mutant
/// `verification/mutants/peek-no-max-record-check.patch`, killed here).
#[test]
fn a_record_longer_than_max_record_inside_the_published_span_is_too_long() {
    let data = u64::from(u32::from_le_bytes(*b"DATA"));
    for config in bounds_configs() {
        let cap = config.capacity;
        for len in [config.max_record + 1, config.max_record + 8] {
            let r = Ring::new(config);
            r.poke_u64(TAIL, cap);
            r.poke_u64(DATA, (data << 32) | len);
            let mut rx = r.consumer();
            assert_eq!(
                rx.try_peek().unwrap_err(),
                PopError::Corrupt(Corruption::RecordTooLong(len)),
                "capacity {cap}, max record {}, len {len}",
                config.max_record
            );
            // The largest allowed record at the same place is fine.
            r.poke_u64(DATA, (data << 32) | config.max_record);
            assert_eq!(rx.try_peek().expect("max_record is allowed").len() as u64, config.max_record);
        }
    }
}
