//! The external term format decoder, as every frame from a node is read.
//! Properties: what decodes, encoded again (the codec has an encoder),
//! decodes to the same term, and that encoding is stable; decoding holds
//! at most 96 bytes per input byte (a decoded term is 40, and a vector
//! grows to twice what it holds) plus 1 MiB.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use beamup::node::dist::Term;
use libfuzzer_sys::fuzz_target;

/// Counts the bytes held, and the most held since the last reset.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            PEAK.fetch_max(HELD.fetch_add(l.size(), Relaxed) + l.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        HELD.fetch_sub(l.size(), Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let before = HELD.load(Relaxed);
    PEAK.store(before, Relaxed);
    let decoded = beamup::fuzzing::etf_decode(data);
    let peak = PEAK.load(Relaxed) - before;
    assert!(
        peak <= 96 * data.len() + (1 << 20),
        "decoding {} bytes held {peak} bytes",
        data.len()
    );
    let Ok(t) = decoded else {
        return;
    };
    let _ = t.to_string();
    let bytes = beamup::fuzzing::etf_encode(&t);
    let again = beamup::fuzzing::etf_decode(&bytes)
        .unwrap_or_else(|e| panic!("{t:?} encoded as {bytes:?} does not decode: {e}"));
    if !has_nan(&t) {
        assert_eq!(again, t, "decode(encode(x)) != x");
    }
    assert_eq!(
        beamup::fuzzing::etf_encode(&again),
        bytes,
        "encoding not stable"
    );
});

/// NaN is not equal to itself; such terms are compared by their encoding.
fn has_nan(t: &Term) -> bool {
    match t {
        Term::Float(f) => f.is_nan(),
        Term::List(v) | Term::Tuple(v) => v.iter().any(has_nan),
        Term::ImproperList(v, tail) => v.iter().any(has_nan) || has_nan(tail),
        Term::Map(kv) => kv.iter().any(|(k, v)| has_nan(k) || has_nan(v)),
        _ => false,
    }
}
